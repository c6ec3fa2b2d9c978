"""`Module`: `flax.linen.Module` with PyTorch's `register_parameter` / `register_buffer`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.module import _get_unbound_fn

from .. import state
from .._messages import check_torch_name
from .._parameter import Parameter, check_buffer, check_parameter, is_array_like, typename
from .._registry import BUFFERS, PARAMS, Registry, Slot
from .declare import abstract_buffer, declare_abstract, declare_existing, initial_shape

if TYPE_CHECKING:
    from ..state import IncompatibleKeys

_REGISTRY_ATTR = "_fr_registry"
# Attributes flax itself sets while `setup()` runs: not the user's children.
_FLAX_INTERNAL = frozenset({"_compact_name_scope_modules", _REGISTRY_ATTR})

_OUTSIDE_SETUP = (
    "cannot register {what} '{name}' of {cls} outside setup(): flax_registry registers "
    "parameters and buffers in setup(), the counterpart of torch's __init__. Move the "
    "register_{what}() call into {cls}.setup()."
)
_MISSING_VARIABLE = (
    "{kind} '{name}' of {cls} (flax path '{where}') is missing from the variables: {why}. "
    "Pass the complete variables that {cls}.init (or flax_registry.load_state_dict) returned, "
    "all collections together, e.g. model.apply(variables, x) rather than "
    "model.apply({{'params': variables['params']}}, x)."
)
_IMMUTABLE_BUFFERS = (
    "cannot update buffer '{name}' of {cls} (flax path '{where}'): the 'buffers' collection is "
    "immutable in this call. Pass mutable=['buffers'] to apply and take the updated variables "
    "from its second result, or use flax_registry.apply(model, variables, ...), which does both."
)
_TIE_TOO_LATE = (
    "cannot tie '{target}' to '{source}' in {cls}.setup(): '{child}' was already set up, so its "
    "parameter exists on its own. Call tie_parameters() right after assigning the submodules, "
    "before using them in setup()."
)


def _check_name(module: Module, name: Any, what: str) -> None:
    """PyTorch's name checks for `register_parameter` / `register_buffer`, with its messages."""
    check_torch_name(name, what)
    if registry_of(module).owns(name) or (hasattr(module, name) and not _is_argument(module, name)):
        raise KeyError(f"attribute '{name}' already exists")


def _is_argument(module: nn.Module, name: str) -> bool:
    """A constructor argument (dataclass field) may share its name with a tensor, as torch's
    `Linear(bias=True)` registers a parameter `bias`; `self.bias` then stays the argument and
    `self.get_parameter("bias")` reads the tensor."""
    field = module.__dataclass_fields__.get(name)  # type: ignore[attr-defined]
    return field is not None and field.init and name not in ("name", "parent")


def registry_of(module: nn.Module) -> Registry:
    """The registry of a bound module (empty for modules that registered nothing)."""
    registry = module.__dict__.get(_REGISTRY_ATTR)
    if registry is None:
        registry = Registry()
        object.__setattr__(module, _REGISTRY_ATTR, registry)
    return registry


def _where(module: nn.Module) -> str:
    return "/" + "/".join(module.scope.path) if module.scope is not None else "<unbound>"


def modules_in(value: Any, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """Submodules held by an attribute value, named as PyTorch names container children."""
    if isinstance(value, nn.Module):
        yield prefix, value
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from modules_in(item, f"{prefix}.{i}")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from modules_in(item, f"{prefix}.{key}")


def ensure_setup(module: nn.Module) -> None:
    """Run `setup()` now if it has not run (for containers that hand out their children)."""
    module._try_setup()


def is_user_constructed(module: nn.Module) -> bool:
    """False for the clone flax makes (bound to a scope) at every init/apply."""
    from flax.core.scope import Scope

    return not isinstance(module.parent, Scope)


def setup_all(module: nn.Module) -> None:
    """Run `setup()` of every registry module reachable from bound `module` (what a torch
    module's constructor does: create every registered tensor), reading nothing."""
    if not isinstance(module, Module):
        return
    module._try_setup()
    registry = registry_of(module)
    for _, child in [*field_children(module), *registry.modules.items()]:
        if child is not None:
            setup_all(child)


def field_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Submodules passed as constructor arguments (dataclass fields), named by their field, as
    torch names a module its `__init__` assigned to `self.<arg>`; they come before those of
    `setup()`. A field the module names itself (a container's children) is skipped."""
    registry = registry_of(module)
    taken = {id(child) for child in registry.modules.values()}
    children = []
    for field in dataclasses.fields(module):
        if (
            not field.init
            or field.name in ("parent", "name")
            or field.name in registry.module_attrs
        ):
            continue
        for name, child in modules_in(module.__dict__.get(field.name), field.name):
            if id(child) not in taken:
                children.append((name, child))
    return children


class Module(nn.Module):
    """A `flax.linen.Module` with PyTorch's module-state contract.

    In `setup()` (the counterpart of `__init__`):

    - `register_parameter(name, Parameter(...) | None)` creates a learnable tensor in the
      `params` collection;
    - `register_buffer(name, value, persistent=True)` creates a tensor in the separate
      `buffers` collection, which no optimizer sees; `persistent=False` keeps it out of
      `state_dict()` and of every checkpoint;
    - submodules assigned to attributes become children, named as in PyTorch (`fc`,
      `layers.0` for a list attribute `layers`);
    - a plain array assigned to an attribute is neither a parameter nor a buffer.

    Inside `__call__`, `self.<name>` reads the current value, and `update_buffer(name, value)`
    changes a buffer (pass `mutable=['buffers']`, or use `flax_registry.apply`).

    Differences from `torch.nn.Module`: registration happens once per setup, so registering
    a name twice raises instead of replacing the tensor; `init` never runs a buffer update
    (the variables it returns are the freshly constructed state, as a new torch module's).
    """

    _version: ClassVar[int] = 1
    """PyTorch's `_version` of this module's state layout (recorded in a torch state dict's
    `_metadata`); raise it when a release adds a buffer, as torch's BatchNorm did."""

    _added_in_version: ClassVar[Mapping[str, int]] = {}
    """Buffers added in a later `_version`, by name: a state dict without version metadata (a
    hand-made dict, an old file) or of an older version may lack them, and loading then keeps
    their current value, as PyTorch's `_load_from_state_dict` does for `num_batches_tracked`."""

    # --- registration (setup) -------------------------------------------------------------

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Add a parameter, as `torch.nn.Module.register_parameter`.

        `param` is a `Parameter` or `None` (a registered, absent parameter: left out of every
        listing). A bare array raises `TypeError`, as PyTorch does for a plain tensor.
        """
        self._require_setup("parameter", name)
        _check_name(self, name, "parameter")
        registry = registry_of(self)
        if param is None:
            registry.parameters[name] = None
            return
        check_parameter(name, param)
        tied = self._tied_source(name, param)
        if tied is not None:
            registry.parameters[name] = tied
            return
        if self.is_initializing():
            if not declare_abstract(self, name, param):
                self.param(name, param.initial_value)
        elif not self.has_variable(PARAMS, name):
            self._raise_missing("parameter", name, PARAMS)
        elif not declare_existing(self, name, param):
            self.param(name, param.initial_value)  # flax's own shape check raises its error
        registry.parameters[name] = Slot(
            name, "parameter", PARAMS, (*self._path(), name), trainable=param.trainable
        )

    def register_buffer(
        self,
        name: str,
        tensor: Any,
        persistent: bool = True,
        *,
        shape: tuple[int, ...] | None = None,
        dtype: Any = None,
    ) -> None:
        """Add a buffer, as `torch.nn.Module.register_buffer`.

        `tensor` is an array, `None`, a zero-argument callable returning the initial value,
        or a flax-style initializer `init(key, shape, dtype)` when `shape` is given. Buffers
        live in the `buffers` collection; a non-persistent one is there at apply time but is
        left out of `state_dict()` and of checkpoints, and, when the variables passed to apply
        lack it, is recomputed from its initial value (as PyTorch recomputes it in `__init__`).
        """
        self._require_setup("buffer", name)
        _check_name(self, name, "buffer")
        registry = registry_of(self)
        if tensor is None:
            registry.buffers[name] = None
            return
        check_buffer(name, tensor)
        init = abstract_buffer(tensor, self._buffer_init(tensor, shape, dtype), shape, dtype)
        slot = Slot(name, "buffer", BUFFERS, (*self._path(), name), persistent=persistent)
        registry.buffers[name] = slot
        if self.is_initializing() or self.has_variable(BUFFERS, name):
            self.variable(BUFFERS, name, init)
        elif persistent:
            self._raise_missing("buffer", name, BUFFERS)
        else:
            registry.fallback[name] = init()

    def register_module(self, name: str, module: nn.Module | None) -> None:
        """Add a child module under the PyTorch name `name`, as `torch.nn.Module.register_module`
        (`add_module`).

        Assigning an attribute in `setup()` does this already; this call is for names an
        attribute cannot take: a name equal to a constructor argument (torch's
        `TransformerEncoderLayer(dropout=0.1)` has a child `dropout`), or container children
        named `0`, `1`, ... . A module held by a field or attribute keeps its flax scope name;
        one not yet adopted is adopted under the flax name `_<name>`.
        """
        self._require_setup("module", name)
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"{typename(module)} is not a Module subclass")
        _check_name(self, name, "module")
        if module is not None and module.name is None:
            super().__setattr__(f"_{name}", module)
            module = self.__dict__[f"_{name}"]
        registry_of(self).modules[name] = module

    def tie_parameters(self, target: str, source: str) -> None:
        """Make parameter `target` the same tensor as `source` (dotted names below this module).

        The counterpart of `self.lm_head.weight = self.tok_emb.weight` in PyTorch: one
        variable (the source's), listed once by `named_parameters` and under both names by
        `state_dict`. Call it in `setup()` right after assigning the submodules.
        """
        registry = registry_of(self)
        child_name = target.rpartition(".")[0]
        child = registry.modules.get(child_name)
        if child is not None and child._state.setup_called == nn.module.SetupState.DONE:
            raise RuntimeError(
                _TIE_TOO_LATE.format(
                    target=target, source=source, cls=type(self).__name__, child=child_name
                )
            )
        registry.ties[target] = source

    def _buffer_init(self, tensor: Any, shape: Any, dtype: Any) -> Callable[[], Any]:
        if is_array_like(tensor):
            return lambda: jnp.asarray(tensor)
        if shape is None:
            return tensor
        return lambda: tensor(self.make_rng(PARAMS), tuple(shape), dtype or jnp.float32)

    def _path(self) -> tuple[str, ...]:
        assert self.scope is not None, "registration needs a bound module (it runs in setup)"
        return tuple(self.scope.path)

    def _require_setup(self, what: str, name: str) -> None:
        if not self._state.in_setup:
            raise RuntimeError(_OUTSIDE_SETUP.format(what=what, name=name, cls=type(self).__name__))

    def _raise_missing(self, kind: str, name: str, collection: str) -> None:
        if self.scope is not None and self.scope.is_collection_empty(collection):
            why = f"no '{collection}' collection was passed"
        else:
            why = f"the '{collection}' collection has no entry for it"
        raise ValueError(
            _MISSING_VARIABLE.format(
                kind=kind.capitalize(),
                name=name,
                cls=type(self).__name__,
                where=_where(self),
                why=why,
            )
        )

    def _tied_source(self, name: str, param: Parameter) -> Slot | None:
        """The source slot when an ancestor tied this parameter to another one."""
        relative = name
        module: nn.Module = self
        while isinstance(module.parent, nn.Module):
            parent = module.parent
            registry = registry_of(parent)
            local = next((k for k, v in registry.modules.items() if v is module), module.name)
            relative = f"{local}.{relative}"
            if relative in registry.ties:
                source = _resolve_parameter(parent, registry.ties[relative])
                expected = initial_shape(param).shape
                actual = jnp.shape(read(parent, source))
                if expected != actual:
                    raise ValueError(
                        f"cannot tie '{relative}' to '{registry.ties[relative]}': shapes "
                        f"{expected} and {actual} differ."
                    )
                return Slot(name, "parameter", PARAMS, source.path, trainable=source.trainable)
            module = parent
        return None

    # --- attribute access -------------------------------------------------------------------

    def __setattr__(self, name: str, val: Any) -> None:
        if not self._state.in_setup or name.startswith("__") or name in _FLAX_INTERNAL:
            super().__setattr__(name, val)
            return
        if isinstance(val, Parameter):
            self.register_parameter(name, val)
            return
        registry = registry_of(self)
        if name in registry.parameters:
            raise TypeError(
                f"cannot assign '{typename(val)}' as parameter '{name}' "
                "(flax_registry.Parameter or None expected)"
            )
        if name in registry.buffers:
            raise TypeError(
                f"cannot assign '{typename(val)}' to buffer '{name}' in setup(): its initial "
                "value is the one given to register_buffer; change it in __call__ with "
                "update_buffer()."
            )
        super().__setattr__(name, val)
        children = list(modules_in(self.__dict__.get(name), name))
        if children:
            registry.module_attrs.add(name)
            registry.modules.update(children)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            registry = self.__dict__.get(_REGISTRY_ATTR)
            if registry is None or name.startswith("__"):
                raise
            if name in registry.parameters:
                return read(self, registry.parameters[name])
            if name in registry.buffers:
                return read(self, registry.buffers[name])
            raise

    # --- buffer updates (apply) -------------------------------------------------------------

    def update_buffer(self, name: str, value: Any) -> None:
        """Set buffer `name` to `value` during apply (the counterpart of an in-place update
        such as `self.running_mean.mul_(...)` in PyTorch).

        The value keeps the buffer's shape and dtype (it is cast, as an in-place copy is). It
        needs `mutable=['buffers']` (or `flax_registry.apply`). During `init` the call does
        nothing: init returns freshly constructed buffers, as a new torch module has.
        """
        self._try_setup()
        registry = registry_of(self)
        slot = registry.buffers.get(name)
        if slot is None:
            known = [k for k, v in registry.buffers.items() if v is not None]
            raise KeyError(
                f"'{name}' is not a buffer of {type(self).__name__}: its buffers are {known}. "
                "Register it in setup() with register_buffer()."
            )
        if self.is_initializing():
            return
        if not self.is_mutable_collection(BUFFERS):
            raise RuntimeError(
                _IMMUTABLE_BUFFERS.format(name=name, cls=type(self).__name__, where=_where(self))
            )
        current = read(self, slot)
        value = jnp.asarray(value)
        if value.shape != jnp.shape(current):
            raise ValueError(
                f"cannot update buffer '{name}' of {type(self).__name__}: the new value has shape "
                f"{value.shape}, the buffer has shape {jnp.shape(current)}."
            )
        registry.fallback.pop(name, None)
        self.put_variable(BUFFERS, name, value.astype(current.dtype))

    # --- init -------------------------------------------------------------------------------

    def init_with_output(  # type: ignore[override]
        self, rngs: Any, *args: Any, method: Callable[..., Any] | str | None = None, **kwargs: Any
    ) -> tuple[Any, Any]:
        """As `flax.linen.Module.init_with_output`, and then every submodule registered in
        `setup()` is set up too, so that the variables hold what `state_dict()` lists even
        for submodules the called method never used (as a torch module's constructor
        creates all of its tensors)."""
        if isinstance(method, str):
            method = getattr(self, method)
        fn = _get_unbound_fn(method if callable(method) else self.__call__)

        if fn is setup_all:  # `abstract_variables` / `init_variables`: one pass is enough
            return super().init_with_output(rngs, *args, method=fn, **kwargs)

        def run_and_setup_all(module: nn.Module, *a: Any, **k: Any) -> Any:
            out = fn(module, *a, **k)
            setup_all(module)
            return out

        return super().init_with_output(rngs, *args, method=run_and_setup_all, **kwargs)

    # --- thin wrappers over the pure functions in flax_registry.state -----------------------

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, jax.Array]]:
        """`state.named_parameters` on this bound module."""
        return state.named_parameters_of(self, prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True) -> Iterator[jax.Array]:
        for _, value in self.named_parameters(recurse=recurse):
            yield value

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, jax.Array]]:
        """`state.named_buffers` on this bound module."""
        return state.named_buffers_of(self, prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> Iterator[jax.Array]:
        for _, value in self.named_buffers(recurse=recurse):
            yield value

    def named_modules(
        self, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Module | None]]:
        """`state.named_modules` on this bound module."""
        return state.named_modules_of(self, prefix, remove_duplicate)

    def state_dict(self, prefix: str = "", keep_vars: bool = False) -> dict[str, jax.Array]:
        """`state.state_dict` on this bound module (`keep_vars` is accepted for PyTorch
        compatibility and has no effect: JAX arrays carry no autograd graph)."""
        return state.state_dict_of(self, prefix)

    def get_submodule(self, target: str) -> nn.Module | None:
        return state.get_submodule_of(self, target)

    def get_parameter(self, target: str) -> jax.Array:
        """The parameter at dotted `target`, as `torch.nn.Module.get_parameter`; for a local
        name, the fast way to read a tensor inside `__call__` (also when a constructor
        argument of the same name shadows `self.<name>`)."""
        return self._get_tensor(target, "parameters", "an nn.Parameter")

    def get_buffer(self, target: str) -> jax.Array:
        """The buffer at dotted `target`, as `torch.nn.Module.get_buffer` (see get_parameter)."""
        return self._get_tensor(target, "buffers", "a buffer")

    def _get_tensor(self, target: str, kind: str, what: str) -> Any:
        if "." not in target:
            self._try_setup()
            slot = getattr(registry_of(self), kind).get(target)
            if slot is not None:
                return read(self, slot)
        getter = state.get_parameter_of if kind == "parameters" else state.get_buffer_of
        return getter(self, target)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> tuple[dict[str, Any], IncompatibleKeys]:
        """`state.load_state_dict` on this bound top-level module: returns the new variables
        and the `IncompatibleKeys` (a bound module cannot change its own variables)."""
        module, variables = self.unbind()
        return state.load_state_dict(module, variables, state_dict, strict=strict)


def read(module: nn.Module, slot: Slot | None) -> Any:
    """The current value of a registered tensor, read through the module that owns it."""
    if slot is None:
        return None
    scope = module.scope
    assert scope is not None
    root_path = scope.path
    if slot.path[:-1] != root_path:  # a tied parameter: read it where its owner keeps it
        value: Any = scope.root.variables()[slot.collection]
        for part in slot.path:
            value = value[part]
        return value
    if module.has_variable(slot.collection, slot.name):
        return module.get_variable(slot.collection, slot.name)
    return registry_of(module).fallback[slot.name]


def _resolve_parameter(module: nn.Module, target: str) -> Slot:
    """The slot of the parameter at dotted `target` below `module` (sets up modules on the way)."""
    *parts, name = target.split(".")
    current = module
    rest = ".".join(parts)
    while rest:
        registry = registry_of(current)
        match = next(
            (
                k
                for k in sorted(registry.modules, key=len, reverse=True)
                if rest == k or rest.startswith(k + ".")
            ),
            None,
        )
        if match is None:
            raise AttributeError(
                f"{type(current).__name__} has no attribute `{rest.split('.')[0]}`"
            )
        current = registry.modules[match]
        current._try_setup()
        rest = rest[len(match) + 1 :]
    current._try_setup()
    slot = registry_of(current).parameters.get(name)
    if slot is None:
        raise AttributeError(f"`{target}` is not a parameter of {type(module).__name__}")
    return slot
