"""PyTorch's contract on NNX models: what is a parameter, a buffer, or neither, checked against
the same module in PyTorch; and PyTorch's messages for registration mistakes."""

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


class Mixed(fr.nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.plain = jnp.ones((10, 10))  # a plain attribute: neither
        self.register_parameter("w", fr.Parameter(jnp.full((3,), 2.0)))
        self.register_buffer("running", jnp.zeros(3))
        self.register_buffer("mask", jnp.ones(3), persistent=False)
        self.register_parameter("absent", None)
        self.drop = nnx.Dropout(0.5, rngs=rngs)  # RNG state: neither
        self.rngs = rngs
        self.fc = nnx_nn.Linear(3, 2, rngs=rngs)
        self.frozen = nnx.Param(jnp.zeros(2), trainable=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return (self.fc(x * self.w).sum() + self.frozen.sum()) ** 2


class TorchMixed(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plain = torch.ones(10, 10)
        self.register_parameter("w", T.Parameter(torch.full((3,), 2.0)))
        self.register_buffer("running", torch.zeros(3))
        self.register_buffer("mask", torch.ones(3), persistent=False)
        self.register_parameter("absent", None)
        self.drop = T.Dropout(0.5)
        self.fc = T.Linear(3, 2)
        self.frozen = T.Parameter(torch.zeros(2), requires_grad=False)


def test_listings_follow_pytorch_not_nnx_state() -> None:
    model, twin = Mixed(nnx.Rngs(0)), TorchMixed()
    assert [k for k, _ in model.named_parameters()] == [k for k, _ in twin.named_parameters()]
    assert [k for k, _ in model.named_buffers()] == [k for k, _ in twin.named_buffers()]
    assert list(model.state_dict()) == list(twin.state_dict())
    assert [k for k, _ in model.named_modules()] == [k for k, _ in twin.named_modules()]
    # NNX itself would save the plain array and the RNG state, sorted by name:
    nnx_keys = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    assert "plain" in nnx_keys and any(".rngs." in k for k in nnx_keys)
    assert "plain" not in model.state_dict() and not any("rngs" in k for k in model.state_dict())
    assert model.absent is None and twin.absent is None


def test_plain_arrays_rng_and_non_persistent_buffers_stay_out_of_checkpoints(tmp_path) -> None:
    import orbax.checkpoint as ocp

    model = Mixed(nnx.Rngs(0))
    with fr.CheckpointManager(tmp_path / "ckpt", model, enable_async=False) as manager:
        manager.save(0, fr.create_train_state(model, fr.train.torch_sgd(0.1)))
    saved = {}
    for item in ("params", "buffers"):  # read with plain orbax
        meta = ocp.StandardCheckpointer().metadata(tmp_path / "ckpt" / "0" / item)
        tree = getattr(meta, "item_metadata", meta)
        saved[item] = sorted(
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
        )
    assert saved == {
        "params": ["['fc']['bias']", "['fc']['weight']", "['frozen']", "['w']"],
        "buffers": ["['buffers']['running']"],  # not the non-persistent mask, no RNG state
    }


def test_frozen_param_holds_no_optimizer_state_and_never_moves() -> None:
    import optax

    model = Mixed(nnx.Rngs(0))
    state = fr.create_train_state(model, fr.train.torch_sgd(0.1, momentum=0.9))

    step = fr.make_train_step(lambda model, x: model(x))
    for _ in range(2):
        state, _ = step(state, jnp.ones((2, 3)))
    named = dict(fr.named_parameters(state.module, state.variables))
    np.testing.assert_array_equal(np.asarray(named["frozen"]), np.zeros(2))
    assert not np.array_equal(np.asarray(named["w"]), np.full(3, 2.0))
    leaves = jax.tree_util.tree_leaves_with_path(state.opt_state)
    assert not any("frozen" in jax.tree_util.keystr(p) for p, _ in leaves)
    assert optax is not None


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda m: m.register_parameter("w", fr.Parameter(jnp.ones(1))),
            KeyError,
            "attribute 'w' already exists",
        ),
        (
            lambda m: m.register_buffer("a.b", jnp.ones(1)),
            KeyError,
            'buffer name can\'t contain "."',
        ),
        (
            lambda m: m.register_parameter("", fr.Parameter(jnp.ones(1))),
            KeyError,
            'parameter name can\'t be empty string ""',
        ),
        (
            lambda m: m.register_parameter("p", jnp.ones(1)),
            TypeError,
            "cannot assign 'jax.Array' object to parameter 'p' "
            "(flax_registry.Parameter or None required)",
        ),
        (lambda m: m.register_module("m", 3), TypeError, "int is not a Module subclass"),
    ],
)
def test_registration_mistakes_use_pytorchs_messages(call, error, message) -> None:
    with pytest.raises(error) as info:
        call(Mixed(nnx.Rngs(0)))
    assert info.value.args[0] == message
