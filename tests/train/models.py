"""A small conv net with BatchNorm, in PyTorch and in `flax_registry.nn`, with the same
state_dict keys, plus the batches and the loss function of the training tests."""

from __future__ import annotations

from typing import Any

import jax
import torch

import flax_registry as fr
from flax_registry.nn import Linear as Linear

from .nets import Net as Net
from .nets import batches as batches
from .nets import cross_entropy as cross_entropy


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


def torch_variables(module: Any, net: torch.nn.Module) -> dict[str, Any]:
    """Variables of `module` holding `net`'s state_dict, loaded strictly into the abstract
    variables (no random init: that would cost seconds of compilation per test)."""
    variables, result = fr.load_state_dict(module, fr.abstract_variables(module), net.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    return variables
