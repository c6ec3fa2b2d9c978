"""The flax.linen front-end: how the core reads, initialises and runs a linen module.

A linen module is a definition; its state is a separate `{collection: tree}` variables dict.
Reading it means binding the definition to the variables and walking the bound modules
(`tree.build`); its variables come from `init` (under `jax.eval_shape` when only shapes are
wanted); running it with buffers mutable is `apply(..., mutable=[...])`.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from .._inputs import Inputs
from .._node import Node
from . import record, tree
from .declare import abstract_mode, declared_init
from .definition import fingerprint
from .module import setup_all

_COMPACT_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*_\d+$")  # flax's names in compact code: Dense_0

_BARE_PARAMS = (
    "variables= for {cls} has no collection level: its top-level keys {keys} are {what}, where "
    "flax expects collections such as 'params'. A Hugging Face model's `model.params` (or "
    "`params_shape_tree`) and flax's `variables['params']` are the 'params' collection "
    "alone: pass variables={{'params': tree}} (with every other collection beside it, e.g. "
    "{{'params': params, 'batch_stats': batch_stats}})."
)
_DOUBLE_WRAPPED = (
    "variables= for {cls} has its collection level twice: variables['params'] holds the "
    "collections {keys}. A Hugging Face model with batch statistics keeps all its "
    "collections in `model.params`: pass that tree itself as variables=, without wrapping "
    "it in {{'params': ...}}."
)
_BOUND = (
    "{cls} is already bound; call the method on it instead "
    "(model.bind(variables).state_dict()), or pass the unbound module."
)


_setup_everything = setup_all  # run as init's method: every registry module set up


_ABSTRACT: dict[Hashable, tuple[Any, list[Any]]] = {}
_ABSTRACT_LIMIT = 64


def _abstract_key(module: nn.Module) -> Hashable | None:
    """What the abstract variables of a definition depend on: the definition itself and the
    dtypes JAX gives (64-bit types on or off); None under a mesh (shardings may differ)."""
    if module.scope is not None or not jax.sharding.get_abstract_mesh().empty:
        return None
    definition = fingerprint(module)
    if definition is None:
        return None
    dtypes = tuple(
        jax.dtypes.canonicalize_dtype(t) for t in (np.int64, np.float64, np.complex128, int, float)
    )
    return (definition, dtypes)


class LinenFrontend:
    """`flax_registry._frontend.Frontend` for `flax.linen.Module`s."""

    name = "flax.linen"
    holds_state = False

    def owns(self, module: Any) -> bool:
        return isinstance(module, nn.Module)

    def unbound(self, module: nn.Module) -> nn.Module:
        return module.unbind()[0] if module.scope is not None else module

    def bound_error(self, module: nn.Module) -> str | None:
        if module.scope is None:
            return None
        return f"{type(module).__name__} is bound; pass the unbound module (module.unbind()[0])."

    def display_name(self, module: nn.Module) -> str:
        return type(module).__name__

    def variables_of(self, module: nn.Module) -> dict[str, Any]:
        if module.scope is None:
            raise TypeError(
                f"{type(module).__name__} is a linen module definition: it holds no variables. "
                "Pass them: f(module, variables, ...)."
            )
        return dict(module.variables)

    def update(self, module: nn.Module, variables: Mapping[str, Any]) -> Any:
        raise TypeError("a linen module cannot hold variables: use the variables returned")

    def eval_mode_layers(self, fn: Any, inputs: Any) -> list[str]:
        from .train_probe import eval_mode_layers

        return eval_mode_layers(fn, inputs)

    def accepts_train(self, module: nn.Module) -> bool:
        from ..nn.mode import accepts_train

        return accepts_train(module)

    def tree(
        self,
        module: nn.Module,
        variables: Mapping[str, Any] | None,
        *,
        records: Any = None,
        torch_view: bool = False,
    ) -> Node:
        """`module` bound to `variables` (or `module` itself when already bound, with
        `variables=None`), read into a tree."""
        if variables is not None and module.scope is not None:
            raise TypeError(_BOUND.format(cls=type(module).__name__))
        if variables is None:  # a bound module, read as it stands
            return tree.build(module, records=records, torch_view=torch_view, target={})
        return tree.read_tree(module, variables, records=records, torch_view=torch_view)

    def listing(self, module: nn.Module, variables: Mapping[str, Any] | None) -> Any:
        """The state API's listings from the structure cache (`tree.listing`), or None: then
        read the tree. Not part of the `Frontend` protocol: the state API asks for it."""
        if variables is None or module.scope is not None:
            return None
        return tree.listing(module, variables)

    def abstract_variables(self, module: nn.Module, inputs: Inputs | None = None) -> Any:
        """`jax.eval_shape` of `init`; without inputs, cached by the definition (see
        `_abstract_key`): a fresh tree of the same `ShapeDtypeStruct`s each call."""
        key = _abstract_key(module) if inputs is None else None
        hit = _ABSTRACT.get(key) if key is not None else None
        if hit is not None:
            return jax.tree_util.tree_unflatten(hit[0], hit[1])
        out = None
        if inputs is None and module.scope is None:
            try:  # declared, traced nothing; its torch view is kept for the conversion
                out, bound = declared_init(module, setup_all)
                tree.remember_torch_view(module, out, bound)
            except Exception:  # what only a traced init can do: trace it (errors raise there)
                out = None
        if out is None:
            # the key is made inside the trace: an eager one compiles XLA's seeding
            with abstract_mode():  # parameters as zeros of their shapes: no initializer traced
                if inputs is not None:
                    return jax.eval_shape(
                        lambda: module.init(jax.random.key(0), *inputs.args, **inputs.kwargs)
                    )
                out = jax.eval_shape(
                    lambda: module.init(jax.random.key(0), method=_setup_everything)
                )
        if key is not None:
            leaves, treedef = jax.tree_util.tree_flatten(out)
            if len(_ABSTRACT) >= _ABSTRACT_LIMIT:
                _ABSTRACT.clear()
            _ABSTRACT[key] = (treedef, leaves)
        return out

    def init_variables(self, module: nn.Module, key: Any, inputs: Inputs | None = None) -> Any:
        if inputs is not None:
            return module.init(key, *inputs.args, **inputs.kwargs)
        return module.init(key, method=_setup_everything)

    def record_layers(self, module: nn.Module, inputs: Inputs) -> tuple[dict[str, Any], Any]:
        return record.record_layers(module, inputs)

    def remembered(self, module: nn.Module) -> Any:
        return record.remembered(module)

    def apply(
        self,
        module: nn.Module,
        variables: Mapping[str, Any],
        *args: Any,
        mutable: Sequence[str] | bool = False,
        rngs: Any = None,
        method: Any = None,
        **kwargs: Any,
    ) -> Any:
        return module.apply(variables, *args, method=method, rngs=rngs, mutable=mutable, **kwargs)

    def initial_values(
        self,
        module: nn.Module,
        inputs: Inputs | None,
        rng: Any,
        idents: Sequence[tuple[str, tuple[str, ...]]],
    ) -> dict[tuple[str, tuple[str, ...]], Any]:
        """`module.init(rng, ...)` jitted with only the chosen leaves as output, so XLA drops
        every other initializer (and a compact model's forward pass) as dead code. A leaf
        that init does not create is None."""

        def pick(key: Any) -> dict[tuple[str, tuple[str, ...]], Any]:
            rngs = {"params": key, "dropout": key}
            if inputs is not None:
                variables = module.init(rngs, *inputs.args, **inputs.kwargs)
            else:
                variables = module.init(rngs, method=_setup_everything)
            out = {}
            for collection, path in idents:
                leaf: Any = variables.get(collection)
                for part in path:
                    leaf = leaf.get(part) if isinstance(leaf, Mapping) else None
                out[(collection, path)] = leaf
            return out

        return jax.jit(pick)(rng)

    def is_library_layer(self, layer: Any) -> bool:
        return type(layer).__module__.split(".")[0] == "flax"

    def cache_key(self, module: nn.Module) -> Hashable | None:
        """The definition's fingerprint (`definition.fingerprint`: None where a field holds a
        value that cannot be vouched for, a config object, an array: no caching)."""
        return fingerprint(self.unbound(module))

    def check_variables(self, module: nn.Module, variables: Any, shapes: Any) -> None:
        """Refuse a variables tree without its collection level (a bare params tree), which
        would otherwise fail far from the cause. With example inputs the collections are known;
        without, the top-level keys are compared with what a collection cannot be: a
        variable, a compact layer's scope name (`Dense_0`) or a submodule `setup()` assigns."""
        if not isinstance(variables, Mapping):
            raise TypeError(
                f"variables= must be a mapping of flax collections ({{'params': ...}}), got "
                f"{type(variables).__name__}."
            )
        keys = list(variables)
        inner = variables.get("params")
        cls = type(module).__name__
        if (
            isinstance(inner, Mapping)
            and "params" in inner
            and "params" not in _setup_names(module)
        ):
            raise ValueError(_DOUBLE_WRAPPED.format(cls=cls, keys=sorted(inner)))
        if not keys or "params" in keys:
            return
        what = ""
        if shapes is not None and "params" in shapes and not set(keys) <= set(shapes):
            what = f"not the collections {cls}.init creates ({sorted(shapes)})"
        elif any(not isinstance(v, Mapping) for v in variables.values()):
            what = "variables themselves"
        elif any(_COMPACT_NAME.match(str(k)) for k in keys):
            what = "layer scope names"
        elif set(keys) & _setup_names(module):
            what = f"submodules of {cls}"
        if what:
            raise ValueError(_BARE_PARAMS.format(cls=cls, keys=sorted(map(str, keys)), what=what))


def _setup_names(module: nn.Module) -> set[str]:
    """The scope names of the submodules `module.setup()` assigns (empty if setup needs
    variables to run)."""
    try:
        bound = module.bind({})
        bound._try_setup()
    except Exception:
        return set()
    return {sub.name for _, _, sub in tree.attribute_children(bound) if sub.name is not None}


LINEN = LinenFrontend()
