"""Mixed precision: bfloat16 compute (read off the lowered step), a toy task's loss after 50
steps within 2% of float32 with float32 master parameters, optimizer state and running
statistics, float16 with dynamic loss scaling skipping an overflowing step and backing off as
`torch.amp.GradScaler` does on the same gradients, and export in the master or another dtype."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import flax_registry as fr
from flax_registry import nn, train

from ..parity import assert_close
from ..parity import key as rbg_key
from .models import Net, TorchNet, batches, cross_entropy, torch_variables

BF16 = train.Policy(compute_dtype=jnp.bfloat16)
FP16 = train.Policy(compute_dtype=jnp.float16)


def _float_dtypes(tree: Any) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bf16_compute_in_the_lowered_step() -> None:
    module = Net()
    state = train.create_train_state(module, fr.abstract_variables(module), train.torch_adamw(1e-2))
    step = train.make_train_step(cross_entropy, policy=BF16)
    batch = jax.tree.map(jnp.asarray, batches(1, batch=8)[0])
    hlo = step.lower(state, batch).as_text()
    heavy = [x for x in hlo.splitlines() if re.search(r"stablehlo\.(convolution|dot_general)", x)]
    assert len(heavy) >= 8, hlo  # 3 forward + their backward passes
    for line in heavy:
        operands = line.rsplit(" : ", 1)[1]
        assert "bf16" in operands and "f32" not in operands, line


class Classifier(fr.Module):
    def setup(self) -> None:
        self.fc1 = nn.Linear(16, 64)
        self.bn = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 4)

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        return self.fc2(jax.nn.relu(self.bn(self.fc1(x), train=train)))


def _toy_data(steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 16)) * 0.7
    out = []
    for _ in range(steps):
        y = rng.integers(0, 4, 32)
        out.append(((centers[y] + rng.standard_normal((32, 16))).astype(np.float32), y))
    return out


def _loss(model: Any, batch: Any) -> Any:
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_toy_task_loss_after_50_steps_within_2_percent_of_fp32() -> None:
    module = Classifier()
    variables = fr.init_variables(module, rbg_key(1))
    data = _toy_data(50)
    final = {}
    for name, policy in (("fp32", None), ("bf16", BF16)):
        state = train.create_train_state(module, variables, train.torch_adam(3e-3))
        step = train.make_train_step(_loss, policy=policy, donate=False)  # variables reused
        for batch in data:
            state, metrics = step(state, batch)
        final[name] = float(metrics["loss"])
        # master parameters, optimizer state and running statistics stay float32
        assert _float_dtypes((state.params, state.opt_state, state.buffers)) == {"float32"}
        assert metrics["loss"].dtype == jnp.float32  # the output dtype
    start = train.create_train_state(module, variables, train.torch_adam(3e-3))
    initial = float(train.make_eval_step(_loss)(start, data[-1])["loss"])
    assert final["fp32"] < 0.7 * initial, (initial, final)  # it learned
    assert abs(final["bf16"] - final["fp32"]) <= 0.02 * final["fp32"], final


def _torch_scaler_run(
    steps: list[np.ndarray], fp16: bool, init_scale: float, growth_interval: int
) -> list[dict[str, Any]]:
    """PyTorch: a Linear layer (float32 master weights, fp16 forward when `fp16`), SGD, and
    `torch.amp.GradScaler`; the loss is the mean of the outputs."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    out = []
    for x in steps:
        opt.zero_grad()
        xt = torch.tensor(x)
        if fp16:
            y = torch.nn.functional.linear(xt.half(), layer.weight.half(), layer.bias.half())
        else:
            y = layer(xt)
        loss = y.float().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        out.append(
            {
                "weight": layer.weight.detach().numpy().copy(),
                "bias": layer.bias.detach().numpy().copy(),
                **scaler.state_dict(),
            }
        )
    return out


def _ours(steps: list[np.ndarray], policy: Any, init_scale: float, growth_interval: int) -> Any:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    module = nn.Linear(4, 2)
    variables = fr.from_torch(module, layer.state_dict())[0]
    scaler = train.GradScaler.create(init_scale=init_scale, growth_interval=growth_interval)
    state = train.create_train_state(
        module, variables, train.torch_sgd(0.1, momentum=0.9), loss_scale=scaler
    )
    step = train.make_train_step(lambda model, x: model(x).mean(), policy=policy, donate=False)
    out = []
    for x in steps:
        before = state
        state, metrics = step(state, x)
        out.append((before, state, metrics))
    return out


def test_grad_scaler_skips_and_backs_off_as_pytorch_on_the_same_gradients() -> None:
    """float32 compute: the gradients are the same numbers in both frameworks, so the scale,
    its growth tracker and the parameters agree exactly, through growth and an overflow
    (x = 1e38: the scaled backward pass overflows to inf)."""
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(7)]
    xs[3] = np.full((3, 4), 1e38, np.float32)
    expected = _torch_scaler_run(xs, fp16=False, init_scale=2.0**10, growth_interval=2)
    ours = _ours(xs, None, init_scale=2.0**10, growth_interval=2)
    scales = []
    for i, ((before, after, metrics), theirs) in enumerate(zip(ours, expected)):
        assert after.loss_scale.state_dict() == {
            k: theirs[k] for k in after.loss_scale.state_dict()
        }
        assert_close(after.params["weight"], theirs["weight"], rtol=1e-6, atol=1e-7)
        assert_close(after.params["bias"], theirs["bias"], rtol=1e-6, atol=1e-7)
        assert bool(metrics["skipped"]) == (i == 3)
        scales.append(theirs["scale"])
    before, after, _ = ours[3]  # the skipped step: nothing moved, the step count included
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state, before.step)), jax.tree.leaves((after.params, after.opt_state, after.step))):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert scales == [2.0**10, 2.0**11, 2.0**11, 2.0**10, 2.0**10, 2.0**11, 2.0**11]


def test_fp16_training_recovers_from_an_injected_overflow_as_pytorch() -> None:
    """float16 compute (fp32 master weights): an input beyond float16's range (1e5 > 65504)
    overflows; both frameworks skip that step and halve the scale, then go on."""
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(6)]
    xs[2] = np.full((3, 4), 1e5, np.float32)
    expected = _torch_scaler_run(xs, fp16=True, init_scale=2.0**16, growth_interval=3)
    ours = _ours(xs, FP16, init_scale=2.0**16, growth_interval=3)
    for i, ((_, after, metrics), theirs) in enumerate(zip(ours, expected)):
        assert after.loss_scale.state_dict() == {
            k: theirs[k] for k in after.loss_scale.state_dict()
        }
        assert bool(metrics["skipped"]) == (i == 2), i
        # float16 forward passes round differently in XLA and PyTorch: the step, not the bits
        assert_close(after.params["weight"], theirs["weight"], rtol=1e-3, atol=1e-4)
        assert _float_dtypes(after.params) == {"float32"}
    assert [t["scale"] for t in expected] == [2.0**16, 2.0**16, 2.0**15, 2.0**15, 2.0**15, 2.0**16]
    assert int(ours[-1][1].step) == len(xs) - 1  # one step skipped


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_export_in_the_master_dtype_or_a_chosen_one(dtype: Any) -> None:
    torch.manual_seed(0)
    net = TorchNet()
    module = Net()
    state = train.create_train_state(module, torch_variables(module, net), train.torch_sgd(0.1))
    exported = fr.to_torch(module, train.export_variables(state.variables, dtype), as_torch=True)
    master = fr.to_torch(module, state.variables, as_torch=True)  # float32: the master dtype
    wanted = torch.float32 if dtype is None else torch.bfloat16
    for key, value in master.items():
        if value.is_floating_point():  # PyTorch's own cast of the float32 master weights
            assert value.dtype == torch.float32 and exported[key].dtype == wanted, key
            assert torch.equal(exported[key], value.to(wanted)), key
        else:  # num_batches_tracked stays an integer
            assert torch.equal(exported[key], value), key
    target = TorchNet().to(wanted)  # PyTorch's model.to(dtype)
    target.load_state_dict(exported, strict=True)
    assert (
        target.conv1.weight.dtype == wanted and target.bn1.num_batches_tracked.dtype == torch.int64
    )
