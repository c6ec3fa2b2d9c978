"""A small conv net with BatchNorm, in PyTorch and in `flax_registry.nn`, with the same
state_dict keys, plus the batches and the loss function of the training tests."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import torch

import flax_registry as fr
from flax_registry.nn import BatchNorm2d, Conv2d, Linear


class Net(fr.Module):
    """conv1 -> bn1 -> relu -> conv2 (stride 2) -> relu -> bn2 -> mean -> fc.

    (conv2's bias sits before a ReLU, not right before a BatchNorm, where its gradient would be
    zero up to rounding and Adam would amplify the rounding noise of either framework.)"""

    channels: int = 4
    classes: int = 3

    def setup(self) -> None:
        c = self.channels
        self.conv1 = Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(c)
        self.conv2 = Conv2d(c, c, 3, stride=2, padding=1)
        self.bn2 = BatchNorm2d(c)
        self.fc = Linear(c, self.classes)

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        x = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        x = self.bn2(jax.nn.relu(self.conv2(x)), train=train)
        return self.fc(x.mean(axis=(2, 3)))


class NNXNet(fr.nnx.Module):
    """`Net` on the NNX front-end: the same layers (`flax_registry.nnx.nn`), registered in
    `__init__`, train/eval from `model.train()` / `model.eval()`."""

    def __init__(self, rngs: Any = None, channels: int = 4, classes: int = 3) -> None:
        from flax import nnx

        from flax_registry.nnx import nn as nnx_nn

        rngs = rngs if rngs is not None else nnx.Rngs(0)
        c = channels
        self.conv1 = nnx_nn.Conv2d(3, c, 3, padding=1, bias=False, rngs=rngs)
        self.bn1 = nnx_nn.BatchNorm2d(c, rngs=rngs)
        self.conv2 = nnx_nn.Conv2d(c, c, 3, stride=2, padding=1, rngs=rngs)
        self.bn2 = nnx_nn.BatchNorm2d(c, rngs=rngs)
        self.fc = nnx_nn.Linear(c, classes, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = self.bn2(jax.nn.relu(self.conv2(x)))
        return self.fc(x.mean(axis=(2, 3)))


class TorchNet(torch.nn.Module):
    def __init__(self, channels: int = 4, classes: int = 3) -> None:
        super().__init__()
        c = channels
        self.conv1 = torch.nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(c)
        self.fc = torch.nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(torch.relu(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def batches(n: int, *, batch: int = 4, size: int = 6, seed: int = 0) -> list[tuple[Any, Any]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.standard_normal((batch, 3, size, size)).astype(np.float32),
            rng.integers(0, 3, batch).astype(np.int32),
        )
        for _ in range(n)
    ]


def cross_entropy(model: Any, batch: Any) -> Any:
    """The loss function of the tests: mean cross-entropy, plus accuracy as a metric."""
    import optax

    x, y = batch
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"accuracy": (logits.argmax(-1) == y).mean()}


def torch_variables(module: Any, net: torch.nn.Module) -> dict[str, Any]:
    """Variables of `module` holding `net`'s state_dict, loaded strictly into the abstract
    variables (no random init: that would cost seconds of compilation per test)."""
    variables, result = fr.load_state_dict(module, fr.abstract_variables(module), net.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    return variables
