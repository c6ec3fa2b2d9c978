"""The kinds of NNX state, as PyTorch sees them: parameters, buffers, and neither.

NNX says what a variable is by its type (`nnx.Param`, `nnx.BatchStat`, ...). PyTorch's
contract adds what NNX lacks: `Buffer`, an `nnx.Variable` for saved-but-never-learned state
with `persistent` metadata (`persistent=False`: not in `state_dict` nor in checkpoints),
registered under the linen collection name `buffers` so `nnx.bridge` maps it to linen's.
An `nnx.Param` may carry `trainable=False` (PyTorch's `requires_grad_(False)`). RNG state
(`nnx.RngState`) and plain array attributes are neither parameters nor buffers: they appear in
no listing and no checkpoint, as a plain tensor attribute of a PyTorch module.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
from flax.nnx import variablelib

from .._registry import BUFFERS, PARAMS


class Buffer(nnx.Variable):  # type: ignore[type-arg]
    """A buffer: state that is saved (unless `persistent=False`) and never learned.

    `Buffer(value, persistent=True)`. The counterpart of `register_buffer`'s tensor; optimizers
    built with `nnx.Optimizer(model, tx, wrt=nnx.Param)` and `flax_registry.train` never see it.
    """


variablelib.register_variable_name(BUFFERS, Buffer, overwrite=True)


def is_rng_state(variable: Any) -> bool:
    return isinstance(variable, nnx.RngState)


def is_parameter(variable: Any) -> bool:
    return isinstance(variable, nnx.Param)


def collection_of(variable: Any) -> str:
    """The linen collection name of a variable's type (`params`, `buffers`, `batch_stats`,
    ...; a type of one's own: its registered name, else its class name)."""
    if isinstance(variable, nnx.Param):
        return PARAMS
    for cls in type(variable).__mro__:
        if cls is nnx.Variable:
            break
        try:
            return variablelib.variable_name_from_type(cls)
        except ValueError:
            continue
    return type(variable).__name__


def metadata(variable: Any, name: str, default: Any) -> Any:
    return variable.get_metadata().get(name, default)
