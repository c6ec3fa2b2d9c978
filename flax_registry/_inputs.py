"""Example inputs for a model's `__call__`: what a compact model needs to create its variables.

A tuple is the positional arguments, a mapping the keyword arguments
(`{"input_ids": ids, "attention_mask": mask}`), `Inputs(*args, **kwargs)` both, and any other
value the one positional argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Inputs:
    """Positional and keyword example inputs for a model's `__call__`, as
    `Inputs(input_ids, attention_mask=mask, deterministic=True)`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"Inputs(args={len(self.args)}, kwargs={sorted(self.kwargs)})"


def as_inputs(example_inputs: Any) -> Inputs | None:
    """`example_inputs` as an `Inputs` (None stays None)."""
    if example_inputs is None or isinstance(example_inputs, Inputs):
        return example_inputs
    if isinstance(example_inputs, tuple):
        return Inputs(*example_inputs)
    if isinstance(example_inputs, Mapping):
        return Inputs(**example_inputs)
    return Inputs(example_inputs)
