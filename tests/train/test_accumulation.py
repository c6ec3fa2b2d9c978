"""Gradient accumulation: 4 micro-batches equal one 4x batch (no BatchNorm), and equal
PyTorch's accumulation loop (`(loss / 4).backward()` four times, then `optimizer.step()`) with
BatchNorm, whose running statistics move once per micro-batch."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import flax_registry as fr
from flax_registry import nn, train

from ..parity import TOL, assert_close
from ..parity import key as rbg_key
from . import torch_runs
from .models import Net, TorchNet, batches, cross_entropy, torch_variables

MICRO = 4


class MLP(fr.Module):
    def setup(self) -> None:
        self.fc1 = nn.Linear(3 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 3)

    def __call__(self, x: Any) -> Any:
        return self.fc2(jax.nn.gelu(self.fc1(x.reshape(x.shape[0], -1))))


def _mlp_loss(model: Any, batch: Any) -> Any:
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_four_micro_batches_equal_one_4x_batch_without_batchnorm() -> None:
    module = MLP()
    start = train.create_train_state(
        module, fr.init_variables(module, rbg_key(0)), train.torch_adam(1e-2)
    )
    whole = train.make_train_step(_mlp_loss, donate=False)
    micro = train.make_train_step(_mlp_loss, micro_batches=MICRO, donate=False)
    a, b = start, start
    for batch in batches(3, batch=16):
        a, ma = whole(a, batch)
        b, mb = micro(b, batch)
        assert_close(mb["loss"], ma["loss"], rtol=1e-6, atol=1e-6)
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):  # fmt: skip
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-6)
    assert int(b.step) == 3


def test_accumulation_with_batchnorm_equals_pytorchs_loop() -> None:
    torch.manual_seed(0)
    net = TorchNet()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    data = batches(3, batch=16)
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # noqa: E731
    expected = torch_runs.train(initial, data, adamw, micro_batches=MICRO, channels=4, classes=3)
    module = Net()
    tx = train.torch_adamw(1e-2, weight_decay=0.1)
    state = train.create_train_state(module, torch_variables(module, net), tx)
    step = train.make_train_step(cross_entropy, micro_batches=MICRO)
    for i, batch in enumerate(data):
        state, metrics = step(state, batch)
        assert_close(metrics["loss"], expected[i]["loss"])
        inner = state.opt_state.inner_states["default"].inner_state
        ours = {f"param/{k}": v for k, v in fr.named_parameters(module, state.variables)}
        ours.update({f"buffer/{k}": v for k, v in fr.named_buffers(module, state.variables)})
        for field in ("exp_avg", "exp_avg_sq"):
            moments = {**state.variables, "params": getattr(inner, field)}
            ours.update({f"{field}/{k}": v for k, v in fr.named_parameters(module, moments)})
        assert set(ours) == set(expected[i]) - {"loss"}
        for key, value in expected[i].items():
            if key != "loss":
                np.testing.assert_allclose(ours[key], value, **TOL, err_msg=f"{key} step {i}")
    # once per micro-batch, as PyTorch's forward passes count them
    assert int(fr.get_buffer(module, state.variables, "bn1.num_batches_tracked")) == 3 * MICRO


def test_a_batch_that_does_not_split_is_refused_naming_the_leaf() -> None:
    module = MLP()
    state = train.create_train_state(
        module, fr.init_variables(module, rbg_key(0)), train.torch_sgd(0.1)
    )
    step = train.make_train_step(_mlp_loss, micro_batches=MICRO)
    x, y = batches(1, batch=10)[0]
    with pytest.raises(ValueError, match=r"splits the batch axis into 4 micro-batches, but batch leaf '0' has shape \(10, 3, 6, 6\): make its leading dimension a multiple of 4"):  # fmt: skip
        step(state, (jnp.asarray(x), jnp.asarray(y)))
    with pytest.raises(ValueError, match="micro_batches must be a positive int"):
        train.make_train_step(_mlp_loss, micro_batches=0)
