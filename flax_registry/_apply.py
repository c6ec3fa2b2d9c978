"""Running a module with its buffers mutable, and building variables without example inputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from ._registry import BUFFERS, PARAMS


def buffer_collections(variables: Mapping[str, Any]) -> list[str]:
    """The collections that hold buffers: `buffers` and every other non-`params` collection."""
    return [BUFFERS, *(c for c in variables if c not in (PARAMS, BUFFERS))]


def apply(
    module: nn.Module,
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
    """
    out, updates = module.apply(
        variables, *args, method=method, rngs=rngs, mutable=buffer_collections(variables), **kwargs
    )
    return out, {**variables, **updates}


def _setup_everything(module: nn.Module) -> None:
    from ._tree import build_tree

    build_tree(module)


def abstract_variables(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The variables of `module` as `jax.ShapeDtypeStruct`s, without allocating any weight.

    With no arguments, only `setup()` runs (enough for modules that register in `setup()`,
    as every `flax_registry` module does); with example inputs, `module.init(key, *args)`
    runs under `jax.eval_shape`, which compact flax modules need to create their variables.
    """
    key = jax.random.key(0)
    if args or kwargs:
        return jax.eval_shape(lambda: module.init(key, *args, **kwargs))
    return jax.eval_shape(lambda: module.init(key, method=_setup_everything))


def init_variables(module: nn.Module, key: Any, *args: Any, **kwargs: Any) -> Any:
    """Concrete variables: `module.init(key, *args)`, or only `setup()` when no inputs are given.

    The counterpart of constructing a torch module: no forward pass is needed for modules
    that register everything in `setup()`.
    """
    if args or kwargs:
        return module.init(key, *args, **kwargs)
    return module.init(key, method=_setup_everything)
