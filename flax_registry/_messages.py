"""PyTorch's `load_state_dict` error wording, in one place, for every loader of this library.

`Module.load_state_dict` in PyTorch raises `RuntimeError("Error(s) in loading state_dict for
Cls:\\n\\t" + "\\n\\t".join(lines))` with these lines; users recognise and search for them, so
`load_state_dict`, `from_torch` and checkpoint restores all speak the same way. Shapes are
printed as tuples, `(3, 4)`, where PyTorch prints `torch.Size([3, 4])`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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
