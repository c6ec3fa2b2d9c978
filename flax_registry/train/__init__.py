"""Training with optax: parameters only, buffers through the forward pass, PyTorch's optimizers.

- `create_train_state(module, variables, tx, frozen=..., param_groups=...)` -> `TrainState`
- `make_train_step(loss_fn)` / `make_eval_step(loss_fn)`: jit-compiled steps
- `torch_sgd`, `torch_adam`, `torch_adamw`: PyTorch's update rules as optax transformations
- `param_labels`, `ParamGroup`: frozen parameters and parameter groups by dotted names
"""

from .._names import VariableInfo as VariableInfo
from .._names import variable_names as variable_names
from ._labels import DEFAULT as DEFAULT
from ._labels import FROZEN as FROZEN
from ._labels import ParamGroup as ParamGroup
from ._labels import param_labels as param_labels
from ._optim import TorchAdamState as TorchAdamState
from ._optim import TorchSGDState as TorchSGDState
from ._optim import torch_adam as torch_adam
from ._optim import torch_adamw as torch_adamw
from ._optim import torch_sgd as torch_sgd
from ._state import TrainState as TrainState
from ._state import create_train_state as create_train_state
from ._step import Model as Model
from ._step import make_eval_step as make_eval_step
from ._step import make_train_step as make_train_step

__all__ = [
    "DEFAULT",
    "FROZEN",
    "Model",
    "ParamGroup",
    "TorchAdamState",
    "TorchSGDState",
    "TrainState",
    "VariableInfo",
    "create_train_state",
    "make_eval_step",
    "make_train_step",
    "param_labels",
    "torch_adam",
    "torch_adamw",
    "torch_sgd",
    "variable_names",
]
