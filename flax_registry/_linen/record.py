"""The layer type at every flax scope of a model, recorded once and remembered per module.

A conversion rule is picked by the type of the layer that owns a variable. Layers assigned in
`setup()` are reachable from the bound module; layers created inside a compact `__call__`
exist only while it runs, so their types are recorded while `init` runs on example inputs
under `jax.eval_shape` (nothing is allocated), with `flax.linen.intercept_methods`. The records
are remembered for the module object (by identity), so `to_torch(module, ...)` after
`from_torch(module, ...)` needs no inputs again.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from .._inputs import Inputs

Records = dict[tuple[str, ...], nn.Module]

_CACHE_SIZE = 16
_REMEMBERED: collections.OrderedDict[int, tuple[weakref.ref[Any], Records]] = (
    collections.OrderedDict()
)


def remember(module: nn.Module, records: Records) -> None:
    """Keep `records` for this module object (the last `_CACHE_SIZE` modules)."""
    if not records:
        return
    try:
        ref = weakref.ref(module)
    except TypeError:
        return
    _REMEMBERED[id(module)] = (ref, records)
    _REMEMBERED.move_to_end(id(module))
    if len(_REMEMBERED) > _CACHE_SIZE:
        _REMEMBERED.popitem(last=False)


def remembered(module: nn.Module) -> Records:
    """The records an earlier conversion made for this very module object (empty when
    there was none; an equal but distinct module has to record its own)."""
    hit = _REMEMBERED.get(id(module))
    if hit is not None and hit[0]() is module:
        return dict(hit[1])
    return {}


def record_layers(module: nn.Module, inputs: Inputs) -> tuple[dict[str, Any], Records]:
    """The abstract variables `module.init` creates on `inputs`, and the module called at
    each scope path (the first module seen there)."""
    records: Records = {}

    def interceptor(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        mod = context.module
        if mod.scope is not None:
            records.setdefault(tuple(mod.scope.path), mod)
        return next_fun(*args, **kwargs)

    key = jax.random.key(0)
    rngs = {"params": key, "dropout": key}
    with nn.intercept_methods(interceptor):
        shapes = jax.eval_shape(lambda: module.init(rngs, *inputs.args, **inputs.kwargs))
    remember(module, records)
    return dict(shapes), records
