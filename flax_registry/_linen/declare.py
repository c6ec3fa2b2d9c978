"""Declaring a registered parameter to flax without the work flax's `Module.param` repeats.

`register_parameter` declares every parameter with `Module.param`. When the variables already
hold it (every `apply`, every module tree the state API reads), flax checks its shape against
`jax.eval_shape` of the initializer: about a millisecond per parameter, most of a state API
call. A `Parameter` states its shape, so `declare_existing` checks that one instead and does
the rest of `Module.param`'s bookkeeping (the name reserved in the scope, recorded as a
child); where the shapes differ it declines, and flax's own check runs and raises its error.

`abstract_mode` is for `abstract_variables`: under `jax.eval_shape`, a parameter's value only
has to have the right shape and dtype, so `declare_abstract` creates a zero of the shape and
dtype its initializer returns and skips flax's per-parameter random key. That shape and dtype
are the declared ones for the initializers of the library's own layers (which return exactly
those), else one `eval_shape` per distinct initializer, shape and dtype (not per parameter).
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import jax
import numpy as np
from flax import errors
from flax.core import meta

from .._parameter import Parameter
from .._registry import PARAMS

_ABSTRACT = threading.local()
_SHAPES: dict[Hashable, jax.ShapeDtypeStruct] = {}
_SHAPES_LIMIT = 4096


@contextlib.contextmanager
def abstract_mode() -> Iterator[None]:
    """Within: parameters created by `register_parameter` are zeros of their initializer's
    shape and dtype (for `jax.eval_shape` of `init`, whose values nobody reads)."""
    previous = getattr(_ABSTRACT, "on", False)
    _ABSTRACT.on = True
    try:
        yield
    finally:
        _ABSTRACT.on = previous


def in_abstract_mode() -> bool:
    return bool(getattr(_ABSTRACT, "on", False))


def _bookkeeping(module: Any, name: str) -> None:
    """What `Module.param` and `Scope.param` record besides the value: the checks that the
    name is free, its reservation in the scope, and the module's child table."""
    if not module._initialization_allowed:
        raise ValueError(
            "Parameters must be initialized in `setup()` or in a method wrapped in `@compact`"
        )
    if module._name_taken(name, collection=PARAMS):
        raise errors.NameInUseError("param", name, module.__class__.__name__)
    module.scope.reserve(name, PARAMS)
    module._state.children[name] = PARAMS


def declared_shape(param: Parameter) -> tuple[int, ...]:
    if param.shape is not None:
        return tuple(param.shape)
    return tuple(np.shape(param.data))


def declare_existing(module: Any, name: str, param: Parameter) -> bool:
    """`module.param(name, ...)` for a parameter the variables hold, checked against the
    declared shape; False (nothing done) where that shape is not the one held."""
    value = meta.unbox(module.scope.get_variable(PARAMS, name))
    leaves = jax.tree_util.tree_leaves(value)
    if len(leaves) != 1 or tuple(np.shape(leaves[0])) != declared_shape(param):
        return False
    _bookkeeping(module, name)
    return True


def x64_enabled() -> bool:
    """Whether 64-bit types are on (dtypes of initial values depend on it)."""
    return bool(jax.dtypes.canonicalize_dtype(np.int64) == np.int64)


def _initializer_key(init: Callable[..., Any], shape: Any, dtype: Any) -> Hashable | None:
    """What the output shape of `init(key, shape, dtype)` depends on, when it is a plain
    function whose closure and defaults are hashable; None otherwise."""
    if not isinstance(init, types.FunctionType):
        return None
    cells = tuple(c.cell_contents for c in init.__closure__ or ())
    key = (
        init.__code__,
        cells,
        init.__defaults__,
        tuple(sorted((init.__kwdefaults__ or {}).items())),
        shape,
        dtype,
        x64_enabled(),
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


_EXACT_MODULES = ("flax_registry.nn.",)
_EXACT_FUNCTIONS = frozenset({id(jax.nn.initializers.ones), id(jax.nn.initializers.zeros)})


def _declared_is_exact(param: Parameter) -> bool:
    """Whether the initializer is known to return exactly the declared shape and dtype: the
    library's own layers' initializers and jax's `ones` / `zeros`, for a floating dtype."""
    init = param.data
    module = getattr(init, "__module__", None) or ""
    known = id(init) in _EXACT_FUNCTIONS or module.startswith(_EXACT_MODULES)
    if not known or param.shape is None:
        return False
    return param.dtype is None or bool(jax.dtypes.issubdtype(param.dtype, np.floating))


def _initial_shape(param: Parameter) -> Any:
    if _declared_is_exact(param):
        assert param.shape is not None
        dtype = jax.dtypes.canonicalize_dtype(
            param.dtype if param.dtype is not None else np.float32
        )
        return jax.ShapeDtypeStruct(tuple(param.shape), dtype)
    key = None
    if callable(param.data) and param.shape is not None:
        key = _initializer_key(param.data, param.shape, param.dtype)
    cached = _SHAPES.get(key) if key is not None else None
    if cached is not None:
        return cached
    out = jax.eval_shape(lambda: param.initial_value(jax.random.key(0)))  # no eager key
    if key is not None:
        if len(_SHAPES) >= _SHAPES_LIMIT:
            _SHAPES.clear()
        _SHAPES[key] = out
    return out


def declare_abstract(module: Any, name: str, param: Parameter) -> bool:
    """In abstract mode, create the parameter as zeros of its initial value's shape and dtype;
    False (nothing done) outside abstract mode or for a value zeros cannot stand for."""
    if not in_abstract_mode() or not module.is_initializing():
        return False
    if not callable(param.data) or module.has_variable(PARAMS, name):
        return False
    aval = _initial_shape(param)
    if not isinstance(aval, jax.ShapeDtypeStruct) or aval.weak_type:
        return False
    if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.extended):
        return False
    _bookkeeping(module, name)
    module.scope.put_variable(PARAMS, name, jax.lax.full(aval.shape, 0, aval.dtype))
    return True
