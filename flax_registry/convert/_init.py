"""Fresh values for chosen variables, from the model's own initializers, and nothing else.

Fine-tuning loads a checkpoint into a model whose head is new: the head's variables must come
from the model's initializers, the rest from the checkpoint, with no full random
initialisation of the whole model first. `fresh_values` jits `module.init` and returns only the
chosen leaves, so XLA removes every other initializer (and the forward pass of a compact
model) as dead code: the cost is the chosen variables, not the model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from ._record import Inputs

Ident = tuple[str, tuple[str, ...]]

_NEEDS_INPUTS = (
    "init= cannot initialise {keys} of {cls}: init without inputs does not create them (flax "
    "layers create their variables when first called). Pass example_inputs= (the inputs "
    "{cls}.init needs)."
)


def matches(key: str, patterns: Sequence[str]) -> bool:
    """`key` matches one of the glob `patterns` (`fnmatch`: `*` spans dots)."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def as_patterns(init: str | Sequence[str] | None) -> tuple[str, ...]:
    if init is None:
        return ()
    if isinstance(init, str):
        return (init,)
    return tuple(init)


def fresh_values(
    module: nn.Module, inputs: Inputs | None, rng: Any, idents: Sequence[Ident], keys: list[str]
) -> dict[Ident, jax.Array]:
    """The initial value of each variable in `idents`, computed by `module.init(rng, ...)`
    with every other variable pruned away by the compiler."""
    from .._apply import _setup_everything

    def pick(key: Any) -> dict[Ident, Any]:
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
            if leaf is None:
                raise ValueError(_NEEDS_INPUTS.format(keys=keys, cls=type(module).__name__))
            out[(collection, path)] = leaf
        return out

    return jax.jit(pick)(rng)
