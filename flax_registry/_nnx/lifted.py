"""`flax_registry.nn`'s layers as NNX modules: one implementation of the math, two front-ends.

`LinenLayer` holds a linen layer's definition (static) and its variables as NNX variables
(`nnx.Param` for parameters, `Buffer` for buffers, with `persistent` from the layer's
registry), and runs the definition with them: `model.train()` / `model.eval()` select
PyTorch's train/eval behaviour (a new layer is in training mode, as a new torch module is),
and in training mode the updated buffers (BatchNorm's running statistics) are written back in
place, as PyTorch updates them. `lift(cls)` makes the NNX class of a linen layer class, with
the linen constructor's arguments plus `rngs=`; a lifted layer passed as an argument (the
layer of `TransformerEncoder`) is unwrapped to its definition.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from .. import _nested
from .._registry import PARAMS
from .module import Module
from .variables import Buffer

_NOT_HASHABLE = (
    "{cls}'s arguments must be hashable to be an NNX module's static definition: {error}. "
    "Pass tuples instead of lists."
)


def _to_nnx(variables: Mapping[str, Any], persistent: Mapping[tuple[str, ...], bool]) -> Any:
    """The variables dict as nested `nnx.Dict`s of NNX variables."""

    def convert(tree: Mapping[str, Any], prefix: tuple[str, ...]) -> nnx.Dict:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            path = (*prefix, key)
            if isinstance(value, Mapping):
                out[key] = convert(value, path)
            elif path[0] == PARAMS:
                out[key] = nnx.Param(value)
            else:
                out[key] = Buffer(value, persistent=persistent.get(path, True))
        return nnx.Dict(out)

    return convert(variables, ())


def plain(tree: Any) -> dict[str, Any]:
    """Nested `nnx.Dict`s of NNX variables as a plain variables dict of values."""
    return {
        key: plain(value) if isinstance(value, nnx.Dict | Mapping) else value.get_value()
        for key, value in tree.items()
    }


class LinenLayer(Module):
    """An NNX module running a linen layer definition on NNX-held variables (with PyTorch's
    state API as methods, as every `flax_registry.nnx.Module`)."""

    def __init__(
        self,
        definition: Any,
        *,
        rngs: nnx.Rngs | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> None:
        from .._names import torch_names
        from .._variables import init_variables

        definition = _hashable(definition)
        self.definition = definition
        if variables is None:
            key = rngs.params() if rngs is not None else jax.random.key(0)
            variables = init_variables(definition, key)
        variables = _complete(definition, variables)
        table = torch_names(definition, variables).table
        persistent = {(c, *p): info.persistent for (c, p), info in table.items()}
        self.variables = _to_nnx(variables, persistent)
        self.deterministic = False  # a new torch module is in training mode
        self.rngs = rngs

    @property
    def training(self) -> bool:
        """PyTorch's `Module.training` (NNX's `model.train()` / `model.eval()` set it)."""
        return not self.deterministic

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .._variables import buffer_collections
        from ..nn.mode import accepts_train

        variables = plain(self.variables)
        train = kwargs.pop("train", self.training)
        if accepts_train(self.definition):
            kwargs["train"] = train
        rngs = None
        if train and self.rngs is not None:
            rngs = {"dropout": self.rngs.dropout()}
        buffers = [c for c in buffer_collections(variables) if c in variables]
        if not (train and buffers):
            return self.definition.apply(variables, *args, rngs=rngs, **kwargs)
        out, updates = self.definition.apply(variables, *args, rngs=rngs, mutable=buffers, **kwargs)
        for path, value in _nested.leaves(updates):
            variable = self.variables
            for part in path:
                variable = variable[part]
            variable.set_value(value)
        return out


def _complete(definition: Any, variables: Mapping[str, Any]) -> dict[str, Any]:
    """`variables` with every registered tensor present: a non-persistent buffer that no load
    filled in gets the value the definition computes for it (as PyTorch's `__init__`)."""
    from .._frontend import frontend_of
    from .._node import all_slots

    out = _nested.copy_dicts(variables)
    root = frontend_of(definition).tree(definition, variables)
    for _, slot, value in all_slots(root):
        if _nested.get(out, (slot.collection, *slot.path), None) is None:
            _nested.set_leaf(out, (slot.collection, *slot.path), value)
    return out


def _hashable(definition: Any) -> Any:
    """`definition` with list fields as tuples (PyTorch takes `normalized_shape=[3, 4]`; an
    NNX module's static definition must hash)."""
    try:
        hash(definition)
        return definition
    except TypeError:
        pass
    lists = {
        f.name: _tuples(getattr(definition, f.name))
        for f in dataclasses.fields(definition)
        if f.init and isinstance(getattr(definition, f.name), list)
    }
    if lists:
        definition = dataclasses.replace(definition, **lists)
    try:
        hash(definition)
    except TypeError as error:
        raise TypeError(_NOT_HASHABLE.format(cls=type(definition).__name__, error=error)) from None
    return definition


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _unwrap(value: Any) -> Any:
    if isinstance(value, LinenLayer):
        return value.definition
    if isinstance(value, list | tuple):
        return type(value)(_unwrap(v) for v in value)
    return value


@functools.cache
def lift(cls: type) -> type:
    """The NNX class of linen layer class `cls`: `lift(nn.Linear)(3, 4, rngs=nnx.Rngs(0))`."""

    def __init__(self: LinenLayer, *args: Any, rngs: nnx.Rngs | None = None, **kwargs: Any) -> None:
        definition = cls(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
        LinenLayer.__init__(self, definition, rngs=rngs)

    doc = f"`flax_registry.nn.{cls.__name__}` as an NNX module (see `LinenLayer`).\n\n"
    namespace = {
        "__init__": __init__,
        "__doc__": doc + (cls.__doc__ or ""),
        "__module__": "flax_registry.nnx.nn",
        # PyTorch's state versions of the layer (a state dict may lack `num_batches_tracked`)
        "_version": getattr(cls, "_version", 1),
        "_added_in_version": getattr(cls, "_added_in_version", {}),
    }
    return type(cls.__name__, (LinenLayer,), namespace)
