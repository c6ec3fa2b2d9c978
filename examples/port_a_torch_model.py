"""Port a PyTorch model to flax_registry, line by line, and load its PyTorch weights.

Each PyTorch class below is followed by its flax_registry port. The ports keep every name
(`layer2.0.downsample.0.weight`), every layout (OIHW kernels, NCHW inputs) and every
number (BatchNorm's running statistics, `num_batches_tracked`), so a PyTorch `state_dict`
loads strictly, with no renaming table. What changes, and only that:

- constructor arguments become dataclass fields, `__init__` becomes `setup()`;
- `forward` becomes `__call__` with a `train` flag: `model.apply(variables, x)` is torch's
  `model.eval(); model(x)` and `fr.apply(model, variables, x, train=True)` is
  `model.train(); model(x)`, returning the updated BatchNorm buffers in new variables;
- a submodule passed as a constructor argument (`downsample`) is registered explicitly.

The script "trains" the PyTorch model a little (a few train-mode forwards move the running
statistics), loads its weights twice — straight from `state_dict()`, and from a safetensors
file read without torch — and prints the largest differences from PyTorch.

    python examples/port_a_torch_model.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch
from torch import Tensor, nn

import flax_registry as fr
from flax_registry import nn as frnn
from flax_registry.io import open_checkpoint, save_safetensors

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# BasicBlock: PyTorch, then the port
# ---------------------------------------------------------------------------------------------


class TorchBasicBlock(nn.Module):
    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class BasicBlock(fr.Module):
    inplanes: int  # constructor arguments: dataclass fields
    planes: int
    stride: int = 1
    downsample: frnn.Sequential | None = None

    def setup(self) -> None:  # __init__
        self.conv1 = frnn.Conv2d(self.inplanes, self.planes, 3, self.stride, padding=1, bias=False)
        self.bn1 = frnn.BatchNorm2d(self.planes)
        self.relu = frnn.ReLU(inplace=True)
        self.conv2 = frnn.Conv2d(self.planes, self.planes, 3, padding=1, bias=False)
        self.bn2 = frnn.BatchNorm2d(self.planes)
        if self.downsample is not None:  # an argument that is also a child: name it
            self.register_module("downsample", self.downsample)

    def __call__(self, x: Array, *, train: bool = False) -> Array:  # forward
        identity = x
        out = self.relu(self.bn1(self.conv1(x), train=train))
        out = self.bn2(self.conv2(out), train=train)
        if self.downsample is not None:
            identity = self.downsample(x, train=train)
        return self.relu(out + identity)


# ---------------------------------------------------------------------------------------------
# ResNet-18 (torchvision's topology, narrow widths): PyTorch, then the port
# ---------------------------------------------------------------------------------------------


class TorchResNet(nn.Module):
    def __init__(
        self, widths: tuple[int, ...] = (64, 128, 256, 512), num_classes: int = 10
    ) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], 2)
        self.layer2 = self._make_layer(widths[1], 2, stride=2)
        self.layer3 = self._make_layer(widths[2], 2, stride=2)
        self.layer4 = self._make_layer(widths[3], 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [TorchBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [TorchBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class ResNet(fr.Module):
    widths: tuple[int, ...] = (64, 128, 256, 512)
    num_classes: int = 10

    def setup(self) -> None:
        self.inplanes = self.widths[0]
        self.conv1 = frnn.Conv2d(3, self.widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = frnn.BatchNorm2d(self.widths[0])
        self.relu = frnn.ReLU(inplace=True)
        self.maxpool = frnn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(self.widths[0], 2)
        self.layer2 = self._make_layer(self.widths[1], 2, stride=2)
        self.layer3 = self._make_layer(self.widths[2], 2, stride=2)
        self.layer4 = self._make_layer(self.widths[3], 2, stride=2)
        self.avgpool = frnn.AdaptiveAvgPool2d((1, 1))
        self.fc = frnn.Linear(self.widths[3], self.num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> frnn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = frnn.Sequential(
                frnn.Conv2d(self.inplanes, planes, 1, stride, bias=False), frnn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return frnn.Sequential(*layers)

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x), train=train)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x, train=train)  # Sequential passes `train` on to the blocks
        x = self.avgpool(x).reshape(x.shape[0], -1)  # torch.flatten(x, 1)
        return self.fc(x)


# ---------------------------------------------------------------------------------------------
# Loading PyTorch weights
# ---------------------------------------------------------------------------------------------


def load_from_torch(model: ResNet, torch_model: nn.Module) -> Any:
    """Strict, no renaming: the port's variables holding torch's state_dict. The abstract
    variables give shapes and dtypes only, so no random initialisation runs."""
    variables, _ = fr.load_state_dict(model, fr.abstract_variables(model), torch_model.state_dict())
    return variables


def load_without_torch(model: ResNet, path: Path) -> Any:
    """The same from a safetensors file: nothing here needs torch."""
    with open_checkpoint(path) as checkpoint:
        variables, _ = fr.load_state_dict(model, fr.abstract_variables(model), checkpoint)
    return variables


def compare(ours: Any, theirs: Tensor) -> tuple[float, bool]:
    """The largest absolute difference, and whether it is within rtol = atol = 1e-5."""
    a, b = np.asarray(ours, np.float64), theirs.detach().double().numpy()
    return float(np.max(np.abs(a - b))), bool(np.allclose(a, b, rtol=1e-5, atol=1e-5))


def main() -> int:
    widths = (16, 32, 64, 128)
    torch.manual_seed(0)
    torch_model = TorchResNet(widths)
    torch_model.train()
    with torch.no_grad():  # "training" in PyTorch: moves the BatchNorm running statistics
        for _ in range(3):
            torch_model(torch.randn(8, 3, 64, 64))
    x = torch.randn(8, 3, 64, 64)

    model = ResNet(widths)
    variables = load_from_torch(model, torch_model)
    ours_sd, theirs_sd = fr.state_dict(model, variables), torch_model.state_dict()
    same_keys = list(ours_sd) == list(theirs_sd) and all(
        tuple(ours_sd[k].shape) == tuple(v.shape) for k, v in theirs_sd.items()
    )
    print(
        f"state_dict: {len(theirs_sd)} keys; names, order and shapes as PyTorch's: "
        f"{'yes' if same_keys else 'NO'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet.safetensors"
        save_safetensors({k: v.numpy() for k, v in theirs_sd.items()}, path)  # the torch side
        from_file = load_without_torch(model, path)

    # eval: torch's model.eval(); model(x)  ==  model.apply(variables, x)
    torch_model.eval()
    with torch.no_grad():
        expected = torch_model(x)
    forward = jax.jit(model.apply)
    results = {
        "eval, weights from state_dict()": compare(forward(variables, x.numpy()), expected),
        "eval, weights from safetensors (no torch)": compare(
            forward(from_file, x.numpy()), expected
        ),
    }

    # train: torch's model.train(); model(x)  ==  fr.apply(model, variables, x, train=True)
    torch_model.train()
    with torch.no_grad():
        expected = torch_model(x)  # updates torch's running statistics in place
    train_step = jax.jit(lambda v, x: fr.apply(model, v, x, train=True))
    out, new_variables = train_step(variables, x.numpy())
    results["train, output"] = compare(out, expected)
    ours_buffers = dict(fr.named_buffers(model, new_variables))
    buffers = [compare(ours_buffers[k], b) for k, b in torch_model.named_buffers()]
    results["train, updated buffers (running stats, counters)"] = (
        max(diff for diff, _ in buffers),
        all(ok for _, ok in buffers),
    )

    for name, (diff, _) in results.items():
        print(f"{name:<50} max |flax - torch| = {diff:.1e}")
    ok = same_keys and all(ok for _, ok in results.values())
    print(f"agrees with PyTorch (rtol = atol = 1e-5): {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
