"""Training with optax: parameters only, buffers through the forward pass, PyTorch's optimizers.

- `create_train_state(module, variables, tx, frozen=..., param_groups=...)` -> `TrainState`
- `make_train_step(loss_fn)` / `make_eval_step(loss_fn)`: jit-compiled steps
- `torch_sgd`, `torch_adam`, `torch_adamw`: PyTorch's update rules as optax transformations
- `param_labels`, `ParamGroup`: frozen parameters and parameter groups by dotted names
- `from_torch_checkpoint` / `to_torch_checkpoint`: a PyTorch training run (model, optimizer
  state, LR scheduler) into a `TrainState` and back; `optimizer_state_from_torch` /
  `optimizer_state_to_torch` for the optimizer alone
- `StepLR`, `MultiStepLR`, `ConstantLR`, `ExponentialLR`, `CosineAnnealingLR`, `LinearLR`,
  `OneCycleLR`, `LambdaLR`, `SequentialLR`: PyTorch's LR schedulers as optax schedules
- `shard_train_state(state, mesh, DATA_PARALLEL | FULLY_SHARDED | spec)`,
  `train_state_shardings`, `fully_sharded`, `shard_batch`: training on a device mesh
  (DDP / FSDP), named by PyTorch names; `bytes_per_device` to see what each device holds
- `Policy`, `GradScaler`: mixed precision and float16 loss scaling (`torch.amp`)
"""

from .._names import VariableInfo as VariableInfo
from .._names import variable_names as variable_names
from ._batch import shard_batch as shard_batch
from ._labels import DEFAULT as DEFAULT
from ._labels import FROZEN as FROZEN
from ._labels import ParamGroup as ParamGroup
from ._labels import param_labels as param_labels
from ._one_cycle import OneCycleLR as OneCycleLR
from ._one_cycle import TorchMomentum as TorchMomentum
from ._optim import TorchAdamState as TorchAdamState
from ._optim import TorchOptimizer as TorchOptimizer
from ._optim import TorchSGDState as TorchSGDState
from ._optim import torch_adam as torch_adam
from ._optim import torch_adamw as torch_adamw
from ._optim import torch_sgd as torch_sgd
from ._precision import Policy as Policy
from ._precision import cast_floating as cast_floating
from ._precision import export_variables as export_variables
from ._scaler import GradScaler as GradScaler
from ._schedules import ConstantLR as ConstantLR
from ._schedules import CosineAnnealingLR as CosineAnnealingLR
from ._schedules import ExponentialLR as ExponentialLR
from ._schedules import LambdaLR as LambdaLR
from ._schedules import LinearLR as LinearLR
from ._schedules import MultiStepLR as MultiStepLR
from ._schedules import SequentialLR as SequentialLR
from ._schedules import StepLR as StepLR
from ._schedules import TorchLR as TorchLR
from ._schedules import TorchScheduler as TorchScheduler
from ._sharding import DATA_PARALLEL as DATA_PARALLEL
from ._sharding import FULLY_SHARDED as FULLY_SHARDED
from ._sharding import bytes_per_device as bytes_per_device
from ._sharding import fully_sharded as fully_sharded
from ._sharding import shard_train_state as shard_train_state
from ._sharding import train_state_shardings as train_state_shardings
from ._state import TrainState as TrainState
from ._state import create_train_state as create_train_state
from ._step import Model as Model
from ._step import make_eval_step as make_eval_step
from ._step import make_train_step as make_train_step
from ._torch_checkpoint import TorchCheckpointExtras as TorchCheckpointExtras
from ._torch_checkpoint import from_torch_checkpoint as from_torch_checkpoint
from ._torch_checkpoint import to_torch_checkpoint as to_torch_checkpoint
from ._torch_optimizer_export import optimizer_state_to_torch as optimizer_state_to_torch
from ._torch_optimizer_state import TorchOptimizerLayout as TorchOptimizerLayout
from ._torch_optimizer_state import optimizer_state_from_torch as optimizer_state_from_torch

__all__ = [
    "DATA_PARALLEL",
    "DEFAULT",
    "FROZEN",
    "FULLY_SHARDED",
    "ConstantLR",
    "CosineAnnealingLR",
    "ExponentialLR",
    "GradScaler",
    "LambdaLR",
    "LinearLR",
    "Model",
    "MultiStepLR",
    "OneCycleLR",
    "ParamGroup",
    "Policy",
    "SequentialLR",
    "StepLR",
    "TorchAdamState",
    "TorchCheckpointExtras",
    "TorchLR",
    "TorchMomentum",
    "TorchOptimizer",
    "TorchOptimizerLayout",
    "TorchSGDState",
    "TorchScheduler",
    "TrainState",
    "VariableInfo",
    "bytes_per_device",
    "cast_floating",
    "create_train_state",
    "export_variables",
    "from_torch_checkpoint",
    "fully_sharded",
    "make_eval_step",
    "make_train_step",
    "optimizer_state_from_torch",
    "optimizer_state_to_torch",
    "param_labels",
    "shard_batch",
    "shard_train_state",
    "to_torch_checkpoint",
    "torch_adam",
    "torch_adamw",
    "torch_sgd",
    "train_state_shardings",
    "variable_names",
]
