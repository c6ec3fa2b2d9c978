"""PyTorch's `load_state_dict` error wording, in one place, for every loader of this library.

`Module.load_state_dict` in PyTorch raises `RuntimeError("Error(s) in loading state_dict for
Cls:\\n\\t" + "\\n\\t".join(lines))` with these lines; users recognise and search for them, so
`load_state_dict`, `from_torch` and checkpoint restores all speak the same way. Shapes are
printed as tuples, `(3, 4)`, where PyTorch prints `torch.Size([3, 4])`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._parameter import typename


def quoted(keys: Sequence[str]) -> str:
    """`"a", "b"`: how PyTorch lists keys."""
    return ", ".join(f'"{k}"' for k in keys)


def missing_keys(keys: Sequence[str], where: str = "state_dict") -> str:
    return f"Missing key(s) in {where}: {quoted(keys)}. "


def unexpected_keys(keys: Sequence[str], where: str = "state_dict") -> str:
    return f"Unexpected key(s) in {where}: {quoted(keys)}. "


def size_mismatch(key: str, checkpoint_shape: Any, model_shape: Any) -> str:
    return (
        f"size mismatch for {key}: copying a param with shape {tuple(checkpoint_shape)} from "
        f"checkpoint, the shape in current model is {tuple(model_shape)}."
    )


def load_error(cls: str, lines: Sequence[str]) -> RuntimeError:
    """The `RuntimeError` of a failed load, as PyTorch raises it."""
    return RuntimeError(f"Error(s) in loading state_dict for {cls}:\n\t" + "\n\t".join(lines))


def abstract_left(cls: str, keys: Sequence[str], fix: str) -> RuntimeError:
    """A non-strict load that would leave abstract variables: PyTorch's missing-keys line and
    why nothing is filled in for them."""
    return RuntimeError(
        f"Error(s) in loading state_dict for {cls}:\n\t{missing_keys(keys)}\n"
        "strict=False would leave these variables uninitialised (abstract jax.ShapeDtypeStruct "
        f"leaves), and nothing is ever filled from random initialisation unasked. {fix}"
    )


def torch_size(shape: Sequence[int]) -> str:
    """A shape as PyTorch's own messages print it inside text: `[2, 3, 4]`."""
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def check_torch_name(name: Any, what: str) -> None:
    """PyTorch's checks on the name of a parameter, buffer or module (`register_parameter`,
    `register_buffer`, `add_module`), with its messages."""
    if not isinstance(name, str):
        raise TypeError(f"{what} name should be a string. Got {typename(name)}")
    if "." in name:
        got = f", got: {name}" if what == "module" else ""
        raise KeyError(f'{what} name can\'t contain "."{got}')
    if name == "":
        raise KeyError(f'{what} name can\'t be empty string ""')
