"""flax_registry: PyTorch's module-state contract for Flax.

Parameters (learnable, saved) live in the `params` collection, buffers (saved, never learned;
`persistent=False`: not saved either) in `buffers`, and every variable has its PyTorch
`state_dict` name.
"""

from . import _linen as _linen  # registers the flax.linen front-end
from . import _nnx as _nnx  # registers the flax.nnx front-end
from . import checkpoint as checkpoint
from . import convert as convert
from . import io as io
from . import nn as nn
from . import nnx as nnx
from . import train as train
from ._linen import Module as Module
from ._parameter import Parameter as Parameter
from ._variables import abstract_variables as abstract_variables
from ._variables import apply as apply
from ._variables import init_variables as init_variables
from ._version import __version__ as __version__
from .checkpoint import CheckpointManager as CheckpointManager
from .convert import LoadReport as LoadReport
from .convert import from_torch as from_torch
from .convert import register_rule as register_rule
from .convert import to_torch as to_torch
from .state import IncompatibleKeys as IncompatibleKeys
from .state import buffers as buffers
from .state import get_buffer as get_buffer
from .state import get_parameter as get_parameter
from .state import get_submodule as get_submodule
from .state import load_state_dict as load_state_dict
from .state import named_buffers as named_buffers
from .state import named_modules as named_modules
from .state import named_parameters as named_parameters
from .state import parameters as parameters
from .state import state_dict as state_dict
from .train import ParamGroup as ParamGroup
from .train import TrainState as TrainState
from .train import create_train_state as create_train_state
from .train import make_eval_step as make_eval_step
from .train import make_train_step as make_train_step

__all__ = [
    "CheckpointManager",
    "IncompatibleKeys",
    "LoadReport",
    "Module",
    "ParamGroup",
    "Parameter",
    "TrainState",
    "__version__",
    "abstract_variables",
    "apply",
    "buffers",
    "checkpoint",
    "convert",
    "create_train_state",
    "from_torch",
    "get_buffer",
    "get_parameter",
    "get_submodule",
    "init_variables",
    "io",
    "load_state_dict",
    "make_eval_step",
    "make_train_step",
    "named_buffers",
    "named_modules",
    "named_parameters",
    "nnx",
    "parameters",
    "register_rule",
    "state_dict",
    "to_torch",
    "train",
]
