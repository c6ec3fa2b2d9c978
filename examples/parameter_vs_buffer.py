"""Parameter, buffer or plain attribute: the classic PyTorch demonstration, in flax_registry.

Three versions of one module, each with two bias-free 3x3 convolutions (3 -> 6 -> 9 channels),
a 10x10 `weight` of ones and a 10-element `bias` of zeros, held (a) as plain attributes,
(b) with `register_parameter`, (c) with `register_buffer`, each written for both of Flax's
APIs: linen (`flax_registry.Module`, registering in `setup()`) and NNX
(`flax_registry.nnx.Module`, registering in `__init__`, as PyTorch does). For each, the script
prints what `named_parameters()` and `state_dict()` list, side by side. When PyTorch is
installed, it builds the same three modules in PyTorch, prints them in a third column and
checks that all lists agree.

    python examples/parameter_vs_buffer.py
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import flax_registry as fr
from flax_registry.nn import Conv2d
from flax_registry.nnx import nn as nnx_nn


class PlainAttributes(fr.Module):
    """(a) Plain attributes: neither learned nor saved (torch: `self.weight = torch.ones(...)`)."""

    def setup(self) -> None:
        self.conv1 = Conv2d(3, 6, 3, bias=False)
        self.conv2 = Conv2d(6, 9, 3, bias=False)
        self.weight = jnp.ones((10, 10))
        self.bias = jnp.zeros(10)


class RegisteredParameters(fr.Module):
    """(b) Parameters: learned and saved (torch: `register_parameter`)."""

    def setup(self) -> None:
        self.conv1 = Conv2d(3, 6, 3, bias=False)
        self.conv2 = Conv2d(6, 9, 3, bias=False)
        self.register_parameter("weight", fr.Parameter(jnp.ones((10, 10))))
        self.register_parameter("bias", fr.Parameter(jnp.zeros(10)))


class RegisteredBuffers(fr.Module):
    """(c) Buffers: saved, never learned (torch: `register_buffer`)."""

    def setup(self) -> None:
        self.conv1 = Conv2d(3, 6, 3, bias=False)
        self.conv2 = Conv2d(6, 9, 3, bias=False)
        self.register_buffer("weight", jnp.ones((10, 10)))
        self.register_buffer("bias", jnp.zeros(10))


class NNXPlainAttributes(fr.nnx.Module):
    """(a) in NNX: a plain array attribute is in no listing (PyTorch's rule, not NNX's own)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx_nn.Conv2d(3, 6, 3, bias=False, rngs=rngs)
        self.conv2 = nnx_nn.Conv2d(6, 9, 3, bias=False, rngs=rngs)
        self.weight = jnp.ones((10, 10))
        self.bias = jnp.zeros(10)


class NNXRegisteredParameters(fr.nnx.Module):
    """(b) in NNX: `register_parameter` (an `nnx.Param`)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx_nn.Conv2d(3, 6, 3, bias=False, rngs=rngs)
        self.conv2 = nnx_nn.Conv2d(6, 9, 3, bias=False, rngs=rngs)
        self.register_parameter("weight", fr.Parameter(jnp.ones((10, 10))))
        self.register_parameter("bias", fr.Parameter(jnp.zeros(10)))


class NNXRegisteredBuffers(fr.nnx.Module):
    """(c) in NNX: `register_buffer` (a `flax_registry.nnx.Buffer`)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx_nn.Conv2d(3, 6, 3, bias=False, rngs=rngs)
        self.conv2 = nnx_nn.Conv2d(6, 9, 3, bias=False, rngs=rngs)
        self.register_buffer("weight", jnp.ones((10, 10)))
        self.register_buffer("bias", jnp.zeros(10))


def torch_twins() -> dict[str, Any]:
    """The same three modules in PyTorch."""
    import torch
    from torch import nn

    class TorchBase(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 3, bias=False)
            self.conv2 = nn.Conv2d(6, 9, 3, bias=False)

    class TorchPlain(TorchBase):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.ones(10, 10)
            self.bias = torch.zeros(10)

    class TorchParameters(TorchBase):
        def __init__(self) -> None:
            super().__init__()
            self.register_parameter("weight", nn.Parameter(torch.ones(10, 10)))
            self.register_parameter("bias", nn.Parameter(torch.zeros(10)))

    class TorchBuffers(TorchBase):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", torch.ones(10, 10))
            self.register_buffer("bias", torch.zeros(10))

    return {"a": TorchPlain(), "b": TorchParameters(), "c": TorchBuffers()}


def listing(pairs: Any) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(value.shape)) for name, value in pairs]


def show(title: str, columns: dict[str, list[Any]]) -> bool:
    """Print the listings side by side; whether they all agree."""
    print(f"  {title}")
    width = max([len(f"{n} {s}") for rows in columns.values() for n, s in rows] + [22])
    print("    " + "  ".join(f"{name:<{width}}" for name in columns).rstrip())
    depth = max(len(rows) for rows in columns.values())
    for i in range(depth):
        cells = [f"{r[i][0]} {r[i][1]}" if i < len(r) else "-" for r in columns.values()]
        print("    " + "  ".join(f"{c:<{width}}" for c in cells).rstrip())
    if not depth:
        print("    (empty)")
    first, *others = columns.values()
    return all(rows == first for rows in others)


def main() -> int:
    have_torch = importlib.util.find_spec("torch") is not None
    twins = torch_twins() if have_torch else {}
    linen = {"a": PlainAttributes(), "b": RegisteredParameters(), "c": RegisteredBuffers()}
    nnx_models = {
        "a": NNXPlainAttributes(nnx.Rngs(0)),
        "b": NNXRegisteredParameters(nnx.Rngs(0)),
        "c": NNXRegisteredBuffers(nnx.Rngs(0)),
    }
    titles = {"a": "plain attributes", "b": "register_parameter", "c": "register_buffer"}
    agree = True
    for key, module in linen.items():
        variables = fr.init_variables(module, jax.random.key(0))
        model = nnx_models[key]
        print(f"\n({key}) {titles[key]}: {type(module).__name__} / {type(model).__name__}")
        twin = twins.get(key)
        parameters = {
            "linen": listing(fr.named_parameters(module, variables)),
            "nnx": listing(model.named_parameters()),
        }
        saved = {
            "linen": listing(fr.state_dict(module, variables).items()),
            "nnx": listing(model.state_dict().items()),
        }
        if twin is not None:
            parameters["torch"] = listing(twin.named_parameters())
            saved["torch"] = listing(twin.state_dict().items())
        agree &= show("named_parameters()", parameters)
        agree &= show("state_dict()", saved)
    if not have_torch:
        print("\nPyTorch is not installed: compared linen with NNX only.")
        print("names and shapes agree between linen and NNX:", "yes" if agree else "NO")
        return 0 if agree else 1
    print("\nnames and shapes agree with PyTorch:", "yes" if agree else "NO")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
