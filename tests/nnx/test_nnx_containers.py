"""`flax_registry.nnx.nn`'s containers against PyTorch's: names, order, loading, forward,
indexing; children may be any NNX module (lifted torch-compatible layers, plain nnx layers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as T
from flax import nnx

import flax_registry as fr
from flax_registry.nnx import nn as nnx_nn
from tests.convert._helpers import randomize
from tests.parity import TOL


def _names(model: object) -> list[str]:
    return [n for n, _ in fr.named_modules(model)]


def test_sequential_matches_torch_names_and_numbers() -> None:
    rngs = nnx.Rngs(0)
    ours = nnx_nn.Sequential(
        nnx_nn.Linear(4, 8, rngs=rngs),
        nnx_nn.BatchNorm1d(8, rngs=rngs),
        nnx_nn.ReLU(),
        nnx_nn.Sequential(nnx_nn.Linear(8, 3, rngs=rngs), nnx_nn.Tanh()),
    )
    theirs = randomize(
        T.Sequential(
            T.Linear(4, 8), T.BatchNorm1d(8), T.ReLU(), T.Sequential(T.Linear(8, 3), T.Tanh())
        )
    )
    assert _names(ours) == [n for n, _ in theirs.named_modules()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    for train in (True, False):  # train mode updates the running statistics in place
        ours.train() if train else ours.eval()
        theirs.train(train)
        with torch.no_grad():
            expected = theirs(torch.tensor(x)).numpy()
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, **TOL)
    theirs_buffers = {k: v.numpy() for k, v in theirs.named_buffers()}
    for name, value in ours.named_buffers():
        np.testing.assert_allclose(np.asarray(value), theirs_buffers[name], **TOL, err_msg=name)
    assert len(ours) == 4 and isinstance(ours[-1], nnx_nn.Sequential)
    assert [type(m).__name__ for m in ours] == ["Linear", "BatchNorm1d", "ReLU", "Sequential"]
    with pytest.raises(IndexError):
        ours[4]


def test_module_list_and_dict_of_plain_nnx_layers_match_torch() -> None:
    class Ours(fr.nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.blocks = nnx_nn.ModuleList([nnx.Linear(3, 3, rngs=rngs) for _ in range(2)])
            self.heads = nnx_nn.ModuleDict(
                {"a": nnx_nn.Linear(3, 1, rngs=rngs), "b": nnx.LayerNorm(3, rngs=rngs)}
            )

        def __call__(self, x: jax.Array) -> jax.Array:
            for block in self.blocks:
                x = block(x)
            return self.heads["a"](self.heads["b"](x))

    class Theirs(T.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = T.ModuleList([T.Linear(3, 3) for _ in range(2)])
            self.heads = T.ModuleDict({"a": T.Linear(3, 1), "b": T.LayerNorm(3)})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.heads["a"](self.heads["b"](x))

    theirs = randomize(Theirs())
    ours, report = fr.from_torch(Ours(nnx.Rngs(0)), theirs.state_dict())  # nnx.Linear: by rule
    assert report.ok
    assert _names(ours) == [n for n, _ in theirs.named_modules()]
    assert list(fr.to_torch(ours)) == list(theirs.state_dict())
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, **TOL)
    assert ours.heads.keys() == ("a", "b") and len(ours.blocks) == 2
    with pytest.raises(NotImplementedError):
        ours.blocks(x)


def test_a_module_in_two_places_is_one_module_as_in_torch() -> None:
    rngs = nnx.Rngs(0)
    shared = nnx_nn.Linear(3, 3, rngs=rngs)
    ours = nnx_nn.Sequential(shared, nnx_nn.ReLU(), shared)
    lin = T.Linear(3, 3)
    theirs = T.Sequential(lin, T.ReLU(), lin)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert _names(ours) == [n for n, _ in theirs.named_modules()]
