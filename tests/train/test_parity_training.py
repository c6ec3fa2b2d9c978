"""Training parity with PyTorch: same architecture, same initial weights, same batches; after
each of 5 steps the parameters and buffers agree to 1e-5 (float32), for SGD (momentum,
nesterov, weight decay, dampening), Adam, and AdamW with parameter groups and frozen layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_registry as fr
from flax_registry import train

from ..frontends import frontends
from ..parity import TOL, assert_buffers_match, assert_close
from .models import Net, NNXNet, TorchNet, batches, cross_entropy, torch_variables

STEPS = 5
NO_DECAY = ["*.bias", "bn*.weight"]


def _torch_groups(net: torch.nn.Module, no_decay_wd: float | None) -> list[dict[str, Any]]:
    """torch param_groups: decay for weights, none for biases and BatchNorm weights."""
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if no_decay_wd is None:
        return [{"params": [p for _, p in trainable]}]
    is_no_decay = lambda n: n.endswith(".bias") or n.startswith("bn")  # noqa: E731
    return [
        {"params": [p for n, p in trainable if not is_no_decay(n)]},
        {"params": [p for n, p in trainable if is_no_decay(n)], "weight_decay": no_decay_wd},
    ]


CASES: dict[str, dict[str, Any]] = {
    "sgd_nesterov_wd": dict(
        torch=lambda groups: torch.optim.SGD(
            groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2
        ),
        ours=lambda: train.torch_sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    ),
    "sgd_dampening": dict(
        torch=lambda groups: torch.optim.SGD(
            groups, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=5e-3
        ),
        ours=lambda: train.torch_sgd(0.05, momentum=0.8, dampening=0.3, weight_decay=5e-3),
    ),
    "adam_l2": dict(
        torch=lambda groups: torch.optim.Adam(groups, lr=1e-2, weight_decay=1e-2),
        ours=lambda: train.torch_adam(1e-2, weight_decay=1e-2),
    ),
    "adamw": dict(
        torch=lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
        ours=lambda: train.torch_adamw(1e-2, weight_decay=0.1),
    ),
    "adamw_amsgrad": dict(
        torch=lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, amsgrad=True),
        ours=lambda: train.torch_adamw(1e-2, weight_decay=0.1, amsgrad=True),
    ),
    "adamw_groups_frozen": dict(
        torch=lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
        ours=lambda: train.torch_adamw(1e-2, weight_decay=0.1),
        groups=lambda: [train.ParamGroup(NO_DECAY, train.torch_adamw(1e-2, weight_decay=0.0))],
        frozen=["conv1.*"],
    ),
    "sgd_groups_frozen": dict(
        torch=lambda groups: torch.optim.SGD(
            groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2
        ),
        ours=lambda: train.torch_sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
        groups=lambda: [
            (NO_DECAY, train.torch_sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.0))
        ],
        frozen=["fc.bias"],
    ),
}

_STEP: Callable[..., Any] = train.make_train_step(cross_entropy, donate=False)


def _run_torch_step(net: torch.nn.Module, opt: torch.optim.Optimizer, batch: Any) -> float:
    x, y = batch
    net.train()
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(torch.tensor(x)), torch.tensor(y).long())
    loss.backward()
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("case", list(CASES))
@frontends
def test_training_matches_pytorch_step_for_step(case: str, frontend: str) -> None:
    spec = CASES[case]
    torch.manual_seed(0)
    net = TorchNet()
    frozen = spec.get("frozen", [])
    for name, p in net.named_parameters():
        if any(__import__("fnmatch").fnmatchcase(name, pat) for pat in frozen):
            p.requires_grad_(False)  # the PyTorch counterpart of frozen=
    has_groups = "groups" in spec
    opt = spec["torch"](_torch_groups(net, 0.0 if has_groups else None))
    if frontend == "linen":
        module: Any = Net()
        model_and_variables: tuple[Any, ...] = (module, torch_variables(module, net))
    else:  # an NNX model holds its variables: loaded in place, as in PyTorch
        model = NNXNet()
        assert not model.load_state_dict(net.state_dict()).missing_keys
        model_and_variables = (model,)
    state = train.create_train_state(
        *model_and_variables,
        spec["ours"](),
        frozen=frozen,
        param_groups=spec["groups"]() if has_groups else (),
    )
    module = state.module  # the linen module, or the NNX model's definition
    initial = dict(fr.named_parameters(module, state.variables))
    for i, batch in enumerate(batches(STEPS)):
        torch_loss = _run_torch_step(net, opt, batch)
        state, metrics = _STEP(state, (jnp.asarray(batch[0]), jnp.asarray(batch[1])))
        assert_close(metrics["loss"], np.float32(torch_loss))
        ours = dict(fr.named_parameters(module, state.variables))
        for name, p in net.named_parameters():
            np.testing.assert_allclose(
                ours[name], p.detach().numpy(), **TOL, err_msg=f"{name} step {i}"
            )
            if not p.requires_grad:  # frozen: bit-for-bit unchanged
                np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(initial[name]))
        assert_buffers_match(module, state.variables, net)
        assert int(state.step) == i + 1
    assert int(fr.get_buffer(module, state.variables, "bn1.num_batches_tracked")) == STEPS
