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
import jax.numpy as jnp
import numpy as np
from flax import errors
from flax.core import meta

from .._parameter import Parameter
from .._registry import PARAMS

_ABSTRACT = threading.local()
_SHAPES: dict[Hashable, jax.ShapeDtypeStruct] = {}
_SHAPES_LIMIT = 4096


@contextlib.contextmanager
def abstract_mode(kind: str = "traced") -> Iterator[None]:
    """Within: parameters created by `register_parameter` stand for their initial values:
    zeros of their shape and dtype (`"traced"`, for `jax.eval_shape` of `init`, whose values
    nobody reads), or the `jax.ShapeDtypeStruct` itself (`"declared"`, for `declared_init`,
    which traces nothing); buffers too in the declared mode."""
    previous = getattr(_ABSTRACT, "kind", None)
    _ABSTRACT.kind = kind
    try:
        yield
    finally:
        _ABSTRACT.kind = previous


def in_abstract_mode() -> bool:
    return getattr(_ABSTRACT, "kind", None) is not None


def declared_mode() -> bool:
    return getattr(_ABSTRACT, "kind", None) == "declared"


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


def initial_shape(param: Parameter) -> Any:
    """The shape and dtype of the parameter's initial value (see the module docstring)."""
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
    """In abstract mode, create the parameter as zeros of its initial value's shape and dtype
    (in the declared mode: as its `jax.ShapeDtypeStruct`); False (nothing done) outside
    abstract mode or for a value zeros cannot stand for."""
    if not in_abstract_mode() or not module.is_initializing():
        return False
    if module.has_variable(PARAMS, name):
        return False
    declared = declared_mode()  # the struct itself stands for the value: any value will do
    if not declared and not callable(param.data):
        return False
    aval = initial_shape(param)
    if not isinstance(aval, jax.ShapeDtypeStruct):
        return False
    if not declared and (aval.weak_type or jax.dtypes.issubdtype(aval.dtype, jax.dtypes.extended)):
        return False  # zeros cannot stand for it
    _bookkeeping(module, name)
    value = aval if declared else jax.lax.full(aval.shape, 0, aval.dtype)
    module.scope.put_variable(PARAMS, name, value)
    return True


def abstract_buffer(
    tensor: Any, init: Callable[[], Any], shape: Any = None, dtype: Any = None
) -> Callable[[], Any]:
    """In the declared mode, a buffer's initial value as a `jax.ShapeDtypeStruct`: what
    `jnp.asarray` of a registered array gives (its dtype as JAX canonicalises it, a JAX
    array's weak type kept), else `jax.eval_shape` of the initializer (a flax-style
    `init(key, shape, dtype)` with a key made inside the trace: nothing is drawn); `init`
    otherwise."""
    if not declared_mode():
        return init
    if isinstance(tensor, jax.Array):
        return lambda: jax.ShapeDtypeStruct(tensor.shape, tensor.dtype, weak_type=tensor.weak_type)
    if isinstance(tensor, np.ndarray | np.generic):
        canonical = jax.dtypes.canonicalize_dtype(tensor.dtype)
        return lambda: jax.ShapeDtypeStruct(np.shape(tensor), canonical)
    if callable(tensor) and shape is not None:
        return lambda: jax.eval_shape(
            lambda: tensor(jax.random.key(0), tuple(shape), dtype or jnp.float32)
        )
    return lambda: jax.eval_shape(init)


class _Unsupported(Exception):
    """The declaration pass met something only a traced `init` can do."""


def declared_init(module: Any, setup_all: Callable[[Any], None]) -> tuple[dict[str, Any], Any]:
    """`jax.eval_shape(lambda: module.init(key, method=setup_all))` without tracing: the
    module bound to an empty, mutable scope flagged as initialising (as `init` binds it),
    every registry module set up with its parameters and buffers declared as
    `jax.ShapeDtypeStruct`s. Returns the abstract variables and the bound module (its tree
    is read from it). Raises when the model does what only a traced `init` can (a flax
    layer's own `self.param`, which needs an rng, or anything the pass cannot vouch for):
    the caller then traces."""
    from flax.core import freeze, unfreeze
    from flax.core import scope as core_scope

    root = core_scope.bind({}, rngs=None, mutable=True, flags={"initializing": True})
    bound = module.clone(parent=root, _deep_clone=True)
    with abstract_mode("declared"):
        setup_all(bound)
    variables = unfreeze(freeze(root.mutable_variables()))
    variables.pop("intermediates", None)  # `init` leaves them out
    leaves = jax.tree_util.tree_leaves(variables)
    if not all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
        raise _Unsupported("a value was computed")
    return variables, bound
