"""PyTorch's module-state contract for Flax NNX.

`Module` is `flax.nnx.Module` with `register_parameter` / `register_buffer(persistent=)` /
`register_module` and PyTorch's state API as methods; `Buffer` is the variable type of a
buffer; `flax_registry.nnx.nn` holds `flax_registry.nn`'s layers as NNX modules. Every public
function of `flax_registry` (`state_dict`, `load_state_dict`, `from_torch`, `to_torch`,
`create_train_state`, `CheckpointManager`, ...) accepts an NNX model in place of
`(module, variables)`: the model holds its variables, and loads change it in place.
"""

from .._nnx.adapter import NNXDefinition as NNXDefinition
from .._nnx.module import Module as Module
from .._nnx.tree import eval_shape as eval_shape
from .._nnx.tree import update as update
from .._nnx.variables import Buffer as Buffer
from .._parameter import Parameter as Parameter
from . import nn as nn

__all__ = ["Buffer", "Module", "NNXDefinition", "Parameter", "eval_shape", "nn", "update"]
