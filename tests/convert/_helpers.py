"""Shared helpers for the conversion tests: bit-exact comparison of state dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from tests.parity import to_numpy


def numpy_state(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in sd.items()}


def assert_bit_identical(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Same keys in the same order, same dtypes and shapes, same bytes."""
    a, e = numpy_state(actual), numpy_state(expected)
    assert list(a) == list(e)
    for key in e:
        assert a[key].dtype == e[key].dtype, (key, a[key].dtype, e[key].dtype)
        assert a[key].shape == e[key].shape, (key, a[key].shape, e[key].shape)
        assert a[key].tobytes() == e[key].tobytes(), key


def channels_last(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


def channels_first(x: Any) -> np.ndarray:
    return np.moveaxis(np.asarray(x), -1, 1)


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Random values in every floating parameter and buffer (running_var kept positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                values = torch.randn(t.shape, generator=g) * scale
                t.copy_(values.abs() + 0.5 if name.endswith("running_var") else values)
            elif name.endswith("num_batches_tracked"):
                t.fill_(7)
    return module
