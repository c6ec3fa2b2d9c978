"""The seam between the neutral core and a Flax API: what the core needs from a front-end.

Everything that knows a particular Flax API (flax.linen today, flax.nnx next) lives in one
adapter that implements `Frontend` and registers itself with `register_frontend`; the core
(listings, `state_dict`, loading, conversion, training, checkpoints) asks `frontend_of(module)`
and never touches the API itself. An adapter reads a model into `flax_registry._node.Node`s,
makes its variables (abstract or initial), records the layer type of every scope for the
conversion rules, and runs the model with its buffers mutable.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol

from ._node import Node

ModuleDef = Any
"""A model definition of any front-end (a `flax.linen.Module`, ...): the core never looks inside."""


class Frontend(Protocol):
    """One Flax API, as the core uses it. `variables` is the `{collection: tree}` dict."""

    name: str
    holds_state: bool  # the module holds its variables (NNX) rather than taking them (linen)

    def owns(self, module: Any) -> bool:
        """Whether `module` belongs to this front-end."""
        ...

    def unbound(self, module: Any) -> Any:
        """The module definition without any variables attached."""
        ...

    def bound_error(self, module: Any) -> str | None:
        """Why `module` cannot be converted as given (a bound linen module), or None."""
        ...

    def display_name(self, module: Any) -> str:
        """The model's class name, for messages."""
        ...

    def variables_of(self, module: Any) -> dict[str, Any]:
        """The variables a module holds (front-ends that hold state)."""
        ...

    def update(self, module: Any, variables: Mapping[str, Any]) -> Any:
        """Write `variables` into a module that holds its state, in place; returns it."""
        ...

    def accepts_train(self, module: Any) -> bool:
        """Whether the module selects train/eval behaviour from a `train=` argument."""
        ...

    def eval_mode_layers(self, fn: Any, inputs: Any) -> list[str]:
        """Layers that `fn(inputs)` (a training forward pass) would run in eval mode because
        nothing passes them `train`, and that would behave differently in train mode."""
        ...

    def tree(
        self,
        module: Any,
        variables: Mapping[str, Any] | None,
        *,
        records: Any = None,
        torch_view: bool = False,
    ) -> Node:
        """The module tree of `module` over `variables` (of a bound `module` itself when
        None), one build; with `torch_view`, the conversion view too (`records`: the layer
        types `record_layers` recorded)."""
        ...

    def abstract_variables(self, module: Any, inputs: Any = None) -> dict[str, Any]:
        """The variables as `jax.ShapeDtypeStruct`s (nothing allocated)."""
        ...

    def init_variables(self, module: Any, key: Any, inputs: Any = None) -> dict[str, Any]:
        """Concrete initial variables."""
        ...

    def record_layers(self, module: Any, inputs: Any) -> tuple[dict[str, Any], Any]:
        """Abstract variables and the layer type of every scope, from running `init` on example
        inputs under `jax.eval_shape`; remembered for the module."""
        ...

    def remembered(self, module: Any) -> Any:
        """The records an earlier `record_layers` made for this module object (or empty)."""
        ...

    def check_variables(self, module: Any, variables: Any, shapes: Any) -> None:
        """Raise a clear error for a variables tree of the wrong form (a bare params tree)."""
        ...

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
        """Run the model (`(out, updated collections)` when something is mutable)."""
        ...

    def initial_values(
        self, module: Any, inputs: Any, rng: Any, idents: Sequence[tuple[str, tuple[str, ...]]]
    ) -> dict[tuple[str, tuple[str, ...]], Any]:
        """The initial value of each chosen variable, computing nothing else."""
        ...

    def is_library_layer(self, layer: Any) -> bool:
        """Whether `layer` is one of the Flax API's own layers (whose conventions, such as a
        `kernel` kept as (in, out), only a conversion rule can state)."""
        ...

    def cache_key(self, module: Any) -> Hashable | None:
        """A key under which what a module definition registers may be cached (None: don't)."""
        ...


_FRONTENDS: list[Frontend] = []


def register_frontend(frontend: Frontend) -> None:
    """Make `frontend` available to every public function (adapters call this on import)."""
    if all(f.name != frontend.name for f in _FRONTENDS):
        _FRONTENDS.append(frontend)


def frontend_of(module: Any) -> Frontend:
    """The front-end that owns `module`; a TypeError naming what is accepted otherwise."""
    for frontend in _FRONTENDS:
        if frontend.owns(module):
            return frontend
    names = ", ".join(f.name for f in _FRONTENDS) or "none registered"
    raise TypeError(
        f"expected a Flax module ({names}), got {type(module).__name__}. Pass the model "
        "definition, e.g. a flax.linen.Module or a flax_registry.Module."
    )
