"""The flax.nnx front-end: how the core reads, updates and runs an NNX model.

An NNX model holds its state, so the core's `variables` dict (`{collection: tree}`, paths as
`flax_registry._nnx.tree` reads them) is read from it, and results are written back into it
in place (`load_state_dict`, `from_torch`), as PyTorch loads into a module. Training and
checkpoints work on an `NNXDefinition`: the graph definition and the state of the model it
was made from (RNG state and constants included), which makes a fresh model holding any
variables dict, so a jitted step is a pure function of the variables.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from .._inputs import Inputs
from .._node import Node
from . import tree


class NNXDefinition:
    """An NNX model as a definition: `model_with(variables)` is a new model (its own copy of
    every variable) holding `variables`; compared and hashed by identity (a static argument
    of a jitted step)."""

    def __init__(self, model: nnx.Module) -> None:
        graphdef, state = nnx.split(model)
        self.graphdef, self.state = nnx.split(nnx.merge(graphdef, state, copy=True))
        self.type_name = type(model).__name__
        self.orders = tree.read(model).orders  # NNX sorts attributes when it merges

    def model_with(self, variables: Mapping[str, Any] | None = None) -> nnx.Module:
        model = nnx.merge(self.graphdef, self.state, copy=True)
        if variables is not None:
            tree.update(model, variables)
        return model

    def __repr__(self) -> str:
        return f"NNXDefinition({self.type_name})"


def _read(module: Any, variables: Mapping[str, Any] | None, torch_view: bool = False) -> tree.Read:
    """Read a model (a live one with `variables` overriding its values, or a fresh model of a
    definition holding them)."""
    if isinstance(module, NNXDefinition):
        return tree.read(module.model_with(variables), torch_view=torch_view, orders=module.orders)
    return tree.read(module, torch_view=torch_view, values=variables)


def _model(module: Any, variables: Mapping[str, Any] | None) -> nnx.Module:
    if isinstance(module, NNXDefinition):
        return module.model_with(variables)
    if variables is not None:
        return NNXDefinition(module).model_with(variables)
    return module


def _reseed(model: nnx.Module, rngs: Mapping[str, Any]) -> None:
    """Give every RNG stream of `model` a key derived from `rngs` (its own stream's key when
    given, else the first key folded with the stream's index), so that a step's dropout masks
    are a function of the step's key, as in the linen front-end."""
    tags = sorted({s.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)})
    if not tags or not rngs:
        return
    first = next(iter(rngs.values()))
    keys = {t: rngs.get(t, jax.random.fold_in(first, i)) for i, t in enumerate(tags)}
    nnx.reseed(model, **keys)


class NNXFrontend:
    """`flax_registry._frontend.Frontend` for `flax.nnx.Module`s."""

    name = "flax.nnx"
    holds_state = True

    def owns(self, module: Any) -> bool:
        return isinstance(module, nnx.Module | NNXDefinition)

    def unbound(self, module: Any) -> NNXDefinition:
        return module if isinstance(module, NNXDefinition) else NNXDefinition(module)

    def bound_error(self, module: Any) -> str | None:
        return None

    def display_name(self, module: Any) -> str:
        return module.type_name if isinstance(module, NNXDefinition) else type(module).__name__

    def tree(
        self,
        module: Any,
        variables: Mapping[str, Any] | None,
        *,
        records: Any = None,
        torch_view: bool = False,
    ) -> Node:
        return _read(module, variables, torch_view).root

    def variables_of(self, module: Any) -> dict[str, Any]:
        """The model's variables dict (abstract leaves for a model from `nnx.eval_shape`)."""
        return _read(module, None).variables

    def update(self, module: Any, variables: Mapping[str, Any]) -> Any:
        """Write `variables` into the model, in place; returns the model."""
        tree.update(module, variables)
        return module

    def abstract_variables(self, module: Any, inputs: Inputs | None = None) -> Any:
        values = self.variables_of(module)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), values)

    def init_variables(self, module: Any, key: Any, inputs: Inputs | None = None) -> Any:
        """The values the model was constructed with (an NNX model initialises itself)."""
        return self.variables_of(module)

    def record_layers(self, module: Any, inputs: Inputs) -> tuple[dict[str, Any], Any]:
        return self.variables_of(module), {}

    def remembered(self, module: Any) -> Any:
        return {}

    def check_variables(self, module: Any, variables: Any, shapes: Any) -> None:
        if not isinstance(variables, Mapping):
            raise TypeError(
                f"variables= must be a mapping of collections, got {type(variables).__name__}"
            )

    def apply(
        self,
        module: Any,
        variables: Mapping[str, Any],
        *args: Any,
        mutable: Sequence[str] | bool = False,
        rngs: Any = None,
        method: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Run a fresh model holding `variables`: `train=` selects `model.train()` /
        `model.eval()`, `rngs` reseeds its RNG streams; with `mutable`, also returns the
        updated collections."""
        model = _model(self.unbound(module), variables)
        train = kwargs.pop("train", None)
        if train is not None:
            model.train() if train else model.eval()
        if rngs:
            _reseed(model, rngs)
        if method is None:
            out = model(*args, **kwargs)
        elif isinstance(method, str):
            out = getattr(model, method)(*args, **kwargs)
        else:
            out = method(model, *args, **kwargs)
        if not mutable:
            return out
        new = tree.read(model, orders=getattr(module, "orders", None)).variables
        names = list(new) if mutable is True else list(mutable)
        return out, {c: new[c] for c in names if c in new}

    def initial_values(
        self,
        module: Any,
        inputs: Inputs | None,
        rng: Any,
        idents: Sequence[tuple[str, tuple[str, ...]]],
    ) -> dict[tuple[str, tuple[str, ...]], Any]:
        """An NNX model initialised itself when it was constructed: those values (None where
        the model is abstract)."""
        values = self.variables_of(module)
        out = {}
        for collection, path in idents:
            leaf: Any = values.get(collection)
            for part in path:
                leaf = leaf.get(part) if isinstance(leaf, Mapping) else None
            out[(collection, path)] = None if isinstance(leaf, jax.ShapeDtypeStruct) else leaf
        return out

    def is_library_layer(self, layer: Any) -> bool:
        return type(layer).__module__.split(".")[0] == "flax"

    def cache_key(self, module: Any) -> Hashable | None:
        return module if isinstance(module, NNXDefinition) else None

    def accepts_train(self, module: Any) -> bool:
        return True

    def eval_mode_layers(self, fn: Any, inputs: Any) -> list[str]:
        return []  # NNX selects modes with model.train(): a step always trains every layer


NNX = NNXFrontend()
