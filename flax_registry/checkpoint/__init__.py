"""Checkpoints with orbax: parameters, persistent buffers, optimizer state and metadata per step.

`CheckpointManager` is a thin layer over `orbax.checkpoint.CheckpointManager`, nothing
home-made: one step is one orbax step directory with the items

- `params`: the `params` collection (`StandardSave`);
- `buffers`: every other collection, without non-persistent buffers (they are recomputed
  from the module on restore, as PyTorch recomputes them in `__init__`);
- `opt_state`: the optimizer state (only when a `TrainState` was saved);
- `meta`: JSON with the format, `flax_registry.__version__`, the step, the train state's step
  and key, the PyTorch key map (`state_dict` key -> `[collection, flax path]`) and the shape
  and dtype of every saved leaf (so a restore checks its target before reading any array).

An item without arrays (the buffers of an MLP, a transformer or an LSTM, or of a model whose
only buffers are non-persistent; the state of an optimizer that keeps none) is not written
as an orbax item, which orbax refuses; `meta` lists it under `empty_items`, and a restore
checks that the target's item is empty too.

Orbax gives async saving (the default: the call returns once the arrays are copied to the
host), atomic steps (a step directory is committed only when complete, so a crash mid-save
leaves the previous step as the latest), retention and save-interval policies, and restores
onto any sharding. A checkpoint is readable with plain orbax:
`ocp.CheckpointManager(dir).restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))`.

Differences from `torch.save(model.state_dict())`: restores are strict (a missing, unexpected or
differently shaped key raises, naming it, with PyTorch's wording), into an abstract target
built from the module (no random initialisation, nothing allocated twice), and arrays are cast to
the target's dtype (as `load_state_dict` casts to the model's dtype).
"""

from ._manager import FORMAT as FORMAT
from ._manager import ITEMS as ITEMS
from ._manager import CheckpointManager as CheckpointManager
from ._sharding import ShardingSpec as ShardingSpec
from ._sharding import sharding_rules as sharding_rules

__all__ = ["FORMAT", "ITEMS", "CheckpointManager", "ShardingSpec", "sharding_rules"]
