"""Train / eval mode as an explicit call argument: the counterpart of `model.train()` / `model.eval()`.

PyTorch keeps a `training` flag on every module and flips it recursively with `model.train()`
and `model.eval()`. A flax module is an immutable description, and a flag that changes what
is traced must be static under `jax.jit`, so here the mode is a keyword argument of the call:

- every layer whose behaviour differs between the modes (`Dropout`, the normalization layers,
  ...) takes `train: bool = False` in `__call__`; `False` is torch's eval mode, so
  `model.apply(variables, x)` is inference;
- `fr.apply(model, variables, x, train=True, rngs={'dropout': key})` is torch's
  `model.train(); model(x)`;
- containers (`Sequential`) pass `train=train` on to every child whose `__call__` accepts a
  `train` keyword, so the flag reaches nested containers and user modules that accept it.
  Write your own modules the same way: take `train: bool = False` and pass it on with
  `call(child, x, train=train)`.

`train` must be a Python bool, not a traced value: under `jax.jit` close over it or mark it
static (`jax.jit(step, static_argnames='train')`), so that each mode compiles once.

Data-parallel replicas (`replicas(count, batch_stats)`): where PyTorch runs one process per
device and `torch.nn.SyncBatchNorm` or DDP's default decides whether BatchNorm sees the whole
batch, a jitted JAX program sees the whole (sharded) batch at once. `batch_stats=GLOBAL`
(the default) normalises by the statistics of the whole batch: `SyncBatchNorm`, and also a
single-device run on the same batch. `batch_stats=PER_REPLICA` splits the batch axis into
`count` equal parts, one per replica, each normalised by its own statistics, with the running
statistics taken from the first (DDP's default, `broadcast_buffers=True`). A BatchNorm layer's
own `stats=` field overrides the setting for that layer. `flax_registry.train.make_train_step`
enters this context itself (`batch_norm=`), with `count` read from the batch's sharding.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["GLOBAL", "PER_REPLICA", "Replicas", "accepts_train", "call", "replicas"]

GLOBAL = "global"
"""BatchNorm statistics over the whole batch, across replicas: `torch.nn.SyncBatchNorm`."""
PER_REPLICA = "per_replica"
"""BatchNorm statistics per replica, rank 0's running statistics kept: PyTorch DDP's default."""
BATCH_STATS = (GLOBAL, PER_REPLICA)

_BAD_MODE = (
    "batch_stats must be one of {allowed} (SyncBatchNorm's global statistics or DDP's "
    "per-replica ones), got {found!r}"
)


def check_batch_stats(mode: str) -> str:
    """`mode` if it is GLOBAL or PER_REPLICA; a ValueError naming both otherwise."""
    if mode not in BATCH_STATS:
        raise ValueError(_BAD_MODE.format(allowed=BATCH_STATS, found=mode))
    return mode


@dataclasses.dataclass(frozen=True)
class Replicas:
    """The data-parallel setting a traced forward pass runs under (see the module docstring):
    `count` replicas split the batch axis, `batch_stats` is GLOBAL or PER_REPLICA."""

    count: int = 1
    batch_stats: str = GLOBAL

    def __post_init__(self) -> None:
        check_batch_stats(self.batch_stats)
        if not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"replicas must be a positive int, got {self.count!r}")


_ONE = Replicas()
_REPLICAS: contextvars.ContextVar[Replicas | None] = contextvars.ContextVar(
    "flax_registry_replicas", default=None
)


@contextlib.contextmanager
def replicas(count: int, batch_stats: str = GLOBAL) -> Iterator[Replicas]:
    """Run the forward passes traced inside as `count` data-parallel replicas.

    The setting is read while tracing: enter it inside the function you `jax.jit`, so that
    each setting compiles on its own (`make_train_step` does this for you).

    Args:
        count: the number of replicas the batch axis is split into (the size of the mesh
            axes the batch is sharded over).
        batch_stats: GLOBAL (SyncBatchNorm, the default) or PER_REPLICA (DDP).

    Returns:
        A context manager yielding the `Replicas` setting.
    """
    setting = Replicas(count, batch_stats)
    token = _REPLICAS.set(setting)
    try:
        yield setting
    finally:
        _REPLICAS.reset(token)


def current_replicas() -> Replicas:
    """The `Replicas` setting of the forward pass being traced (one replica by default)."""
    return _REPLICAS.get() or _ONE


@functools.cache
def _signature_accepts_train(call: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get("train")
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def accepts_train(module: Any) -> bool:
    """Whether `module(...)` takes a `train` keyword (an explicit parameter named `train`;
    `**kwargs` alone does not count). The signature is inspected once per class."""
    return callable(module) and _signature_accepts_train(type(module).__call__)


def call(module: Any, *args: Any, train: bool = False, **kwargs: Any) -> Any:
    """`module(*args, **kwargs)`, with `train=train` added when the module accepts it."""
    if accepts_train(module):
        return module(*args, train=train, **kwargs)
    return module(*args, **kwargs)
