"""The same architecture written for the linen front-end and for the NNX front-end: the same
state_dict (keys, order, values) after loading the same PyTorch weights, and the same outputs
and buffers in eval and in train mode, both equal to PyTorch's."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as T
from flax import nnx

import flax_registry as fr
from flax_registry import nn
from flax_registry.nnx import nn as nnx_nn
from tests.convert._helpers import randomize
from tests.parity import TOL, to_numpy


class LinenNet(fr.Module):
    def setup(self) -> None:
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.register_buffer("scale", jnp.full((), 2.0), persistent=False)
        self.head = nn.Linear(6, 4)
        self.register_buffer("steps", jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        h = self.features(x, train=train).reshape(x.shape[0], -1)
        return self.head(h) * self.scale


class NNXNet(fr.nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.features = nnx_nn.Sequential(
            nnx_nn.Conv2d(3, 6, 3, padding=1, rngs=rngs),
            nnx_nn.BatchNorm2d(6, rngs=rngs),
            nnx_nn.ReLU(),
            nnx_nn.AdaptiveAvgPool2d(1),
        )
        self.register_buffer("scale", jnp.full((), 2.0), persistent=False)
        self.head = nnx_nn.Linear(6, 4, rngs=rngs)
        self.register_buffer("steps", jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x).reshape(x.shape[0], -1)) * self.scale


class TorchNet(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = T.Sequential(
            T.Conv2d(3, 6, 3, padding=1), T.BatchNorm2d(6), T.ReLU(), T.AdaptiveAvgPool2d(1)
        )
        self.register_buffer("scale", torch.full((), 2.0), persistent=False)
        self.head = T.Linear(6, 4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1)) * self.scale


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, 3, 5, 5)).astype(np.float32)


def test_linen_and_nnx_front_ends_agree_with_each_other_and_with_torch() -> None:
    twin = randomize(TorchNet())
    twin.scale.fill_(2.0)  # non-persistent: the module's own value, never loaded
    state = twin.state_dict()
    linen_model = LinenNet()
    linen_vars, _ = fr.load_state_dict(linen_model, fr.abstract_variables(linen_model), state)
    nnx_model = NNXNet(nnx.Rngs(0))
    assert not nnx_model.load_state_dict(state).missing_keys  # in place, as PyTorch
    ours_linen = fr.state_dict(linen_model, linen_vars)
    ours_nnx = nnx_model.state_dict()
    assert list(ours_linen) == list(ours_nnx) == list(state)
    for key, value in state.items():
        np.testing.assert_array_equal(np.asarray(ours_nnx[key]), to_numpy(value), err_msg=key)
        np.testing.assert_array_equal(np.asarray(ours_linen[key]), np.asarray(ours_nnx[key]))
    assert (
        [k for k, _ in fr.named_buffers(linen_model, linen_vars)]
        == [k for k, _ in nnx_model.named_buffers()]
        == [k for k, _ in twin.named_buffers()]
    )
    # eval
    twin.eval()
    nnx_model.eval()
    x = _x(0)
    with torch.no_grad():
        expected = twin(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(linen_model.apply(linen_vars, x)), expected, **TOL)
    np.testing.assert_allclose(np.asarray(nnx_model(jnp.asarray(x))), expected, **TOL)
    # train: outputs and running statistics after two passes
    twin.train()
    nnx_model.train()
    for seed in (1, 2):
        x = _x(seed)
        with torch.no_grad():
            expected = twin(torch.tensor(x)).numpy()
        out, linen_vars = fr.apply(linen_model, linen_vars, x, train=True)
        np.testing.assert_allclose(np.asarray(out), expected, **TOL)
        np.testing.assert_allclose(np.asarray(nnx_model(jnp.asarray(x))), expected, **TOL)
    theirs = {k: to_numpy(v) for k, v in twin.named_buffers()}
    for name, value in nnx_model.named_buffers():
        np.testing.assert_allclose(np.asarray(value), theirs[name], **TOL, err_msg=name)
        linen_value = fr.get_buffer(linen_model, linen_vars, name)
        np.testing.assert_array_equal(np.asarray(linen_value), np.asarray(value))
    counter = int(fr.get_buffer(nnx_model, None, "features.1.num_batches_tracked"))
    assert counter == int(twin.features[1].num_batches_tracked) == 7 + 2  # randomize() set 7


def test_nnx_model_under_nnx_jit_and_nnx_optimizer() -> None:
    """NNX's own training loop: nnx.jit, nnx.Optimizer(wrt=nnx.Param) with a torch-exact
    optimizer; buffers are not the optimizer's, they change through the forward pass."""
    import optax

    model = NNXNet(nnx.Rngs(0))
    model.load_state_dict(randomize(TorchNet()).state_dict())
    optimizer = nnx.Optimizer(model, fr.train.torch_sgd(0.1, momentum=0.9), wrt=nnx.Param)
    labels = jnp.array([0, 1, 2, 3])

    @nnx.jit
    def step(model: Any, optimizer: Any, x: jax.Array) -> jax.Array:
        def loss_fn(model: Any) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    before = {k: np.asarray(v) for k, v in model.state_dict().items()}
    losses = [float(step(model, optimizer, jnp.asarray(_x(s)))) for s in range(3)]
    assert losses[-1] < losses[0]
    after = model.state_dict()
    counter = "features.1.num_batches_tracked"
    assert int(after[counter]) == int(before[counter]) + 3
    assert not np.array_equal(np.asarray(after["head.weight"]), before["head.weight"])
    # optimizer state holds parameters only: no entry for any buffer
    opt_leaves = jax.tree_util.tree_leaves_with_path(nnx.state(optimizer.opt_state))
    assert all("running_mean" not in jax.tree_util.keystr(p) for p, _ in opt_leaves)
