"""flax.nnx's own layers against their PyTorch counterparts, by rule, both directions: the
conversion is bit-identical torch -> NNX -> torch and the layers compute the same numbers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as T
from flax import nnx

import flax_registry as fr
from tests.convert._helpers import assert_bit_identical, channels_first, channels_last, randomize
from tests.parity import TOL

CASES: dict[str, tuple[Callable[[], Any], Callable[[], T.Module], tuple[int, ...], bool]] = {
    # name: (NNX layer, torch layer, torch input shape, channels-last input for NNX)
    "Linear": (lambda: nnx.Linear(4, 3, rngs=nnx.Rngs(0)), lambda: T.Linear(4, 3), (2, 4), False),
    "LinearGeneral": (
        lambda: nnx.LinearGeneral(4, (2, 3), rngs=nnx.Rngs(0)),
        lambda: T.Linear(4, 6),
        (2, 4),
        False,
    ),
    "Conv1d-grouped": (
        lambda: nnx.Conv(4, 6, (3,), feature_group_count=2, padding=1, rngs=nnx.Rngs(0)),
        lambda: T.Conv1d(4, 6, 3, groups=2, padding=1),
        (2, 4, 7),
        True,
    ),
    "ConvTranspose2d": (
        lambda: nnx.ConvTranspose(
            3, 2, (3, 3), strides=2, padding=((2, 2), (2, 2)), rngs=nnx.Rngs(0)
        ),
        lambda: T.ConvTranspose2d(3, 2, 3, stride=2),
        (1, 3, 4, 4),
        True,
    ),
    "BatchNorm": (
        lambda: nnx.BatchNorm(3, use_running_average=True, epsilon=1e-5, rngs=nnx.Rngs(0)),
        lambda: T.BatchNorm1d(3).eval(),
        (5, 3),
        False,
    ),
    "LayerNorm": (
        lambda: nnx.LayerNorm(4, epsilon=1e-5, rngs=nnx.Rngs(0)),
        lambda: T.LayerNorm(4),
        (2, 4),
        False,
    ),
    "GroupNorm": (
        lambda: nnx.GroupNorm(4, num_groups=2, epsilon=1e-5, rngs=nnx.Rngs(0)),
        lambda: T.GroupNorm(2, 4),
        (2, 4, 5),
        True,
    ),
    "RMSNorm": (
        lambda: nnx.RMSNorm(4, epsilon=1e-6, rngs=nnx.Rngs(0)),
        lambda: T.RMSNorm(4, eps=1e-6),
        (2, 4),
        False,
    ),
    "Embed": (lambda: nnx.Embed(7, 3, rngs=nnx.Rngs(0)), lambda: T.Embedding(7, 3), (2, 5), False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_nnx_layer_converts_both_ways_and_computes_as_torch(name: str) -> None:
    make, make_torch, shape, channels = CASES[name]
    twin = randomize(make_torch())
    layer, report = fr.from_torch(make(), twin.state_dict())
    assert report.ok, report
    assert_bit_identical(fr.to_torch(layer, report=report), twin.state_dict())
    rng = np.random.default_rng(0)
    x = (
        rng.integers(0, 7, shape)
        if name == "Embed"
        else rng.standard_normal(shape).astype(np.float32)
    )
    with torch.no_grad():
        expected = twin(torch.tensor(x)).numpy()
    out = np.asarray(layer(jnp.asarray(channels_last(x) if channels else x)))
    if channels:
        out = channels_first(out)
    if name == "LinearGeneral":
        out = out.reshape(expected.shape)
    np.testing.assert_allclose(out, expected, **TOL)
