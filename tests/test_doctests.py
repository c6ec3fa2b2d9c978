"""The examples in the public docstrings run, and show what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "flax_registry.state",
    "flax_registry.convert._translate",
    "flax_registry.convert._rules",
    "flax_registry.train._state",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
