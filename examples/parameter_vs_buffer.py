"""Parameter, buffer or plain attribute: the classic PyTorch demonstration, in flax_registry.

Three versions of one module, each with two bias-free 3x3 convolutions (3 -> 6 -> 9 channels),
a 10x10 `weight` of ones and a 10-element `bias` of zeros, held (a) as plain attributes,
(b) with `register_parameter`, (c) with `register_buffer`. For each, the script prints what
`named_parameters()` and `state_dict()` list. When PyTorch is installed, it builds the same
three modules in PyTorch, prints them beside the Flax ones and checks that the lists agree.

    python examples/parameter_vs_buffer.py
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import jax
import jax.numpy as jnp

import flax_registry as fr
from flax_registry.nn import Conv2d


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


def show(title: str, flax_rows: list[Any], torch_rows: list[Any] | None) -> bool:
    print(f"  {title}")
    width = max([len(f"{n} {s}") for n, s in flax_rows] + [24])
    header = f"    {'flax_registry':<{width}}" + ("  torch" if torch_rows is not None else "")
    print(header)
    rows = max(len(flax_rows), len(torch_rows or []))
    for i in range(rows):
        ours = f"{flax_rows[i][0]} {flax_rows[i][1]}" if i < len(flax_rows) else "-"
        theirs = ""
        if torch_rows is not None:
            theirs = f"{torch_rows[i][0]} {torch_rows[i][1]}" if i < len(torch_rows) else "-"
        print(f"    {ours:<{width}}  {theirs}".rstrip())
    if not rows:
        print("    (empty)")
    return torch_rows is None or flax_rows == torch_rows


def main() -> int:
    have_torch = importlib.util.find_spec("torch") is not None
    twins = torch_twins() if have_torch else {}
    modules = {"a": PlainAttributes(), "b": RegisteredParameters(), "c": RegisteredBuffers()}
    titles = {"a": "plain attributes", "b": "register_parameter", "c": "register_buffer"}
    agree = True
    for key, module in modules.items():
        variables = fr.init_variables(module, jax.random.key(0))
        print(f"\n({key}) {titles[key]}: {type(module).__name__}")
        twin = twins.get(key)
        agree &= show(
            "named_parameters()",
            listing(fr.named_parameters(module, variables)),
            listing(twin.named_parameters()) if twin is not None else None,
        )
        agree &= show(
            "state_dict()",
            listing(fr.state_dict(module, variables).items()),
            listing(twin.state_dict().items()) if twin is not None else None,
        )
    if not have_torch:
        print("\nPyTorch is not installed: skipped the side-by-side check.")
        return 0
    print("\nnames and shapes agree with PyTorch:", "yes" if agree else "NO")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
