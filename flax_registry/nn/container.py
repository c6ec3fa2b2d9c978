"""`Sequential`, `ModuleList`, `ModuleDict`: torch.nn's containers, with torch's child names.

Children are named as torch names them: `0`, `1`, ... for `Sequential` and `ModuleList`, the
keys for `ModuleDict` and for a `Sequential` built from an (ordered) dict. So
`Sequential(Linear(2, 3), ReLU(), Linear(3, 1))` has the state_dict keys `0.weight`,
`0.bias`, `2.weight`, `2.bias` and `named_modules()` lists `''`, `'0'`, `'1'`, `'2'`, as torch.
(Inside the flax variables the scopes are flax's own names, `layers_0`, ...; only the
torch-facing names change.)

Train / eval: `Sequential.__call__(input, *, train=False)` passes `train=train` on to each
child whose `__call__` accepts a `train` keyword (see `flax_registry.nn.mode`), so
`fr.apply(model, variables, x, train=True, rngs={'dropout': key})` is torch's
`model.train(); model(x)` and `model.apply(variables, x)` is `model.eval(); model(x)`.

Build containers in `setup()` (torch's `__init__`). Inside a `@nn.compact` method flax names
and binds each layer to the enclosing module the moment it is constructed (`Linear_0`), before
the container sees it, so the torch-style names (`head.0.weight`) only come from `setup()`;
this is the same for `flax.linen.Sequential`.

Differences from torch: containers are immutable (flax modules are frozen dataclasses):
build them whole — there is no `append`, `insert`, `extend`, `del` or item assignment —
and a slice of a `ModuleList` / `Sequential` is a tuple of its (bound) children rather than
a new container. Children must be flax modules (`flax_registry.Module` or any
`flax.linen.Module`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import flax.linen as nn

from .._linen.module import Module, ensure_setup, registry_of
from .._messages import check_torch_name
from .._parameter import typename
from . import mode

_T = TypeVar("_T", bound=type)

_BOTH = (
    "Sequential takes its modules either positionally, Sequential(m0, m1, ...), or as one "
    "ordered dict, Sequential(OrderedDict(name=module)), or as layers=[...] — not several of these."
)


def _check_modules(modules: Sequence[Any]) -> None:
    for module in modules:
        if not isinstance(module, nn.Module):
            raise TypeError(f"{typename(module)} is not a Module subclass")


def _check_names(names: Sequence[Any]) -> None:
    """torch's `add_module` name checks, with its messages."""
    for name in names:
        check_torch_name(name, "module")


def _register_children(
    container: Module, attr: str, names: Sequence[str], children: Sequence[Any]
) -> None:
    """Name the children held by field `attr` as torch does (`0`, `1`, ... or the keys)."""
    registry_of(container).module_attrs.add(attr)
    for name, child in zip(names, children):
        container.register_module(name, child)


def _positional_init(cls: _T) -> _T:
    """Let `cls(m0, m1, ...)` and `cls(OrderedDict(...))` build the dataclass, as torch's
    `Sequential(*args)` does; flax's own keyword construction (`clone`) still works."""
    dataclass_init: Callable[..., None] = cls.__init__  # type: ignore[misc]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            if "layers" in kwargs or "names" in kwargs:
                raise TypeError(_BOTH)
            if len(args) == 1 and isinstance(args[0], Mapping):
                kwargs["names"] = tuple(args[0].keys())
                kwargs["layers"] = tuple(args[0].values())
            else:
                kwargs["layers"] = tuple(args)
        dataclass_init(self, **kwargs)

    __init__.__doc__ = dataclass_init.__doc__
    cls.__init__ = __init__  # type: ignore[misc]
    return cls


class Sequential(Module):
    """`torch.nn.Sequential(*modules)` or `Sequential(OrderedDict(name=module, ...))`.

    `__call__(input, *, train=False)` runs the children in order on one input, passing
    `train` to those that accept it. Indexing, iteration and `len` work on the bound module
    (inside a parent's `__call__`).
    """

    layers: Sequence[nn.Module] = ()
    names: Sequence[str] | None = None

    if TYPE_CHECKING:  # what `_positional_init` accepts, for type checkers

        def __init__(
            self,
            *args: nn.Module | Mapping[str, nn.Module],
            layers: Sequence[nn.Module] = (),
            names: Sequence[str] | None = None,
            parent: Any = ...,
            name: str | None = None,
        ) -> None: ...

    def __init_subclass__(cls, **kwargs: Any) -> None:
        own_init = "__init__" in cls.__dict__
        super().__init_subclass__(**kwargs)  # flax makes the dataclass (and its __init__) here
        if not own_init:
            _positional_init(cls)

    def __post_init__(self) -> None:
        _check_modules(self.layers)
        if self.names is not None:
            if len(self.names) != len(self.layers):
                raise ValueError(
                    f"Sequential got {len(self.names)} names for {len(self.layers)} modules."
                )
            _check_names(self.names)
            if len(set(self.names)) != len(self.names):
                raise KeyError(f"Sequential got duplicate module names: {list(self.names)}")
        super().__post_init__()

    def _child_names(self) -> list[str]:
        return list(self.names) if self.names is not None else [str(i) for i in range(len(self))]

    def setup(self) -> None:
        _register_children(self, "layers", self._child_names(), self.layers)

    def __call__(self, input: Any, *, train: bool = False) -> Any:
        x = input
        for layer in self.layers:
            x = mode.call(layer, x, train=train)
        return x

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[nn.Module]:
        ensure_setup(self)
        return iter(self.layers)

    @overload
    def __getitem__(self, index: int | str) -> nn.Module: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[nn.Module, ...]: ...
    def __getitem__(self, index: int | str | slice) -> nn.Module | tuple[nn.Module, ...]:
        """A child by position (negative allowed), by name, or a tuple for a slice."""
        ensure_setup(self)
        if isinstance(index, str):
            return self.layers[self._child_names().index(index)]
        return _index(self.layers, index, type(self).__name__)


_positional_init(Sequential)


def _index(items: Sequence[Any], index: Any, cls: str) -> Any:
    if isinstance(index, slice):
        return tuple(items[index])
    if not isinstance(index, int):
        raise TypeError(f"{cls} indices must be integers or slices, not {typename(index)}")
    if not -len(items) <= index < len(items):
        raise IndexError(f"index {index} is out of range")
    return items[index]


class ModuleList(Module):
    """`torch.nn.ModuleList(modules)`: children `0`, `1`, ...; no `__call__` (as torch).

    Inside a parent's `__call__`: `for block in self.blocks`, `self.blocks[i]`,
    `len(self.blocks)`.
    """

    modules: Sequence[nn.Module] = ()

    def __post_init__(self) -> None:
        _check_modules(self.modules)
        super().__post_init__()

    def setup(self) -> None:
        _register_children(
            self, "modules", [str(i) for i in range(len(self.modules))], self.modules
        )

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[nn.Module]:
        ensure_setup(self)
        return iter(self.modules)

    @overload
    def __getitem__(self, index: int) -> nn.Module: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[nn.Module, ...]: ...
    def __getitem__(self, index: int | slice) -> nn.Module | tuple[nn.Module, ...]:
        ensure_setup(self)
        return _index(self.modules, index, type(self).__name__)


class ModuleDict(Module):
    """`torch.nn.ModuleDict(modules)`: children named by the keys, in insertion order.

    Inside a parent's `__call__`: `self.heads['cls']`, `'cls' in self.heads`, `keys()`,
    `values()`, `items()`, iteration over the keys, `len`.
    """

    modules: Mapping[str, nn.Module] | None = None

    def __post_init__(self) -> None:
        if self.modules is not None:
            if not isinstance(self.modules, Mapping):
                raise TypeError(
                    "ModuleDict.update should be called with an iterable of key/value pairs, "
                    f"but got {typename(self.modules)}; pass a dict of modules."
                )
            _check_names(list(self.modules))
            _check_modules(list(self.modules.values()))
        super().__post_init__()

    def _items(self) -> Mapping[str, nn.Module]:
        ensure_setup(self)
        return self.modules if self.modules is not None else {}

    def setup(self) -> None:
        items = self._items()
        _register_children(self, "modules", list(items), list(items.values()))

    def __getitem__(self, key: str) -> nn.Module:
        items = self._items()
        if key not in items:
            raise KeyError(f"{key!r} is not a key of this ModuleDict; its keys are {list(items)}")
        return items[key]

    def __contains__(self, key: object) -> bool:
        return key in self._items()

    def __len__(self) -> int:
        return len(self.modules) if self.modules is not None else 0

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def keys(self) -> list[str]:
        return list(self._items())

    def values(self) -> list[nn.Module]:
        return list(self._items().values())

    def items(self) -> list[tuple[str, nn.Module]]:
        return list(self._items().items())
