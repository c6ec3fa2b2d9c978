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
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["accepts_train", "call"]


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
