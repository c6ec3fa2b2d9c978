"""Layers a linen model runs in eval mode during training because it never passes them the
`train` argument they take (a top-level `__call__` without `train`): BatchNorm's statistics
would not update and dropout would do nothing, silently.

`eval_mode_layers(fn, inputs)` traces `fn(inputs)` with a method interceptor that records the
submodules called without the `train` they accept; when there are some, it compares the
program with the one where they get `train=True` (as PyTorch's `model.train()` would switch
them): only layers that then behave differently (BatchNorm, Dropout; not LayerNorm) count.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from ..nn.mode import accepts_train


def _train_unset(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether this call of `module` could take a `train` argument and was not given one."""
    if not accepts_train(module):
        return False
    try:
        bound = inspect.signature(type(module).__call__).bind_partial(module, *args, **kwargs)
    except TypeError:
        return False
    return "train" not in bound.arguments


class _TrainProbe:
    """A method interceptor: records the submodules called without the `train` they take (and,
    with `force`, calls them with `train=True`, as `model.train()` would)."""

    def __init__(self, force: bool) -> None:
        self.force = force
        self.found: dict[str, None] = {}

    def __call__(self, next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        scope = getattr(module, "scope", None)
        path = tuple(scope.path) if scope is not None else ()  # () for the model itself
        if context.method_name == "__call__" and path and _train_unset(module, args, kwargs):
            self.found[f"{type(module).__name__} '{'.'.join(map(str, path))}'"] = None
            if self.force:
                kwargs = {**kwargs, "train": True}
        return next_fun(*args, **kwargs)


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _program(fn: Callable[[Any], Any], inputs: Any, probe: _TrainProbe) -> str:
    """The jaxpr of `fn(inputs)` (array leaves abstract, the rest fixed), with the probe."""
    leaves, treedef = jax.tree.flatten(inputs)
    arrays = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves if _is_array(x)]

    def run(values: list[Any]) -> Any:
        it = iter(values)
        full = [next(it) if _is_array(x) else x for x in leaves]
        with nn.intercept_methods(probe):
            return fn(jax.tree.unflatten(treedef, full))

    return str(jax.make_jaxpr(run)(arrays))


def eval_mode_layers(fn: Callable[[Any], Any], inputs: Any) -> list[str]:
    """The layers `fn(inputs)` calls without the `train` they take and that behave
    differently with `train=True` (empty when there are none)."""
    probe = _TrainProbe(force=False)
    plain = _program(fn, inputs, probe)
    if not probe.found:
        return []
    if plain == _program(fn, inputs, _TrainProbe(force=True)):
        return []
    return list(probe.found)
