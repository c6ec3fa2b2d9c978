"""Running a module with its buffers mutable, and making its variables without a forward pass.

The counterparts of calling a PyTorch module (whose forward may update buffers in place) and
of constructing one (which creates every registered tensor). Each dispatches to the module's
front-end (`flax_registry._frontend`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._frontend import frontend_of
from ._inputs import Inputs
from ._registry import BUFFERS, PARAMS


def buffer_collections(variables: Mapping[str, Any]) -> list[str]:
    """The collections that hold buffers: `buffers` and every other non-`params` collection."""
    return [BUFFERS, *(c for c in variables if c not in (PARAMS, BUFFERS))]


def apply(
    module: Any,
    variables: Mapping[str, Any],
    *args: Any,
    method: Callable[..., Any] | str | None = None,
    rngs: Any = None,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """Run `module` with its buffers mutable; return `(output, new_variables)`.

    The counterpart of calling a torch module, whose forward pass may update its buffers in
    place: here the buffer collections (`buffers`, `batch_stats`, ...) are passed as mutable
    and the updated collections are merged into a new variables dict, so a caller never meets
    flax's `ModifyScopeVariableError`. `variables` is not modified. For inference that must
    not change buffers, call `module.apply(variables, ...)` directly.

    Args:
        module: the model definition (unbound).
        variables: all its collections, `{'params': ..., 'buffers': ..., ...}`.
        *args: the inputs of `__call__` (or of `method`).
        method: the method to run instead of `__call__`.
        rngs: PRNG keys by stream name, e.g. `{'dropout': key}`.
        **kwargs: keyword inputs, e.g. `train=True`.

    Returns:
        `(output, new_variables)`.
    """
    out, updates = frontend_of(module).apply(
        module,
        variables,
        *args,
        method=method,
        rngs=rngs,
        mutable=buffer_collections(variables),
        **kwargs,
    )
    return out, {**variables, **updates}


def abstract_variables(module: Any, *args: Any, **kwargs: Any) -> Any:
    """The variables of `module` as `jax.ShapeDtypeStruct`s, without allocating any weight.

    With no arguments, only `setup()` runs (enough for modules that register in `setup()`,
    as every `flax_registry` module does); with example inputs, `module.init(key, *args)`
    runs under `jax.eval_shape`, which compact flax modules need to create their variables.

    Args:
        module: the model definition.
        *args: example inputs of `__call__` (for compact modules).
        **kwargs: keyword example inputs.

    Returns:
        The variables, `{collection: tree of jax.ShapeDtypeStruct}`.
    """
    inputs = Inputs(*args, **kwargs) if args or kwargs else None
    return frontend_of(module).abstract_variables(module, inputs)


def init_variables(module: Any, key: Any, *args: Any, **kwargs: Any) -> Any:
    """Concrete variables: `module.init(key, *args)`, or only `setup()` when no inputs are given.

    The counterpart of constructing a torch module: no forward pass is needed for modules
    that register everything in `setup()`.

    Args:
        module: the model definition.
        key: the PRNG key of the initializers.
        *args: example inputs of `__call__` (for compact modules).
        **kwargs: keyword example inputs.

    Returns:
        The variables, `{collection: tree of arrays}`.
    """
    inputs = Inputs(*args, **kwargs) if args or kwargs else None
    return frontend_of(module).init_variables(module, key, inputs)
