"""`fingerprint`: a linen module definition as a hashable value, or None where that is unsafe.

What a module registers depends on its definition: its class (its `setup`) and the values of
its fields, submodules included. Linen modules are frozen dataclasses, but Python's `hash`
is no key for them: a field holding a list (`ModuleList(modules=[...])`) makes the module
unhashable, and an object with identity hashing (a mutable config) would let a cached
structure outlive a change to it. So the fingerprint is built here, field by field, from
values known to be immutable: numbers (NumPy scalars too), strings, dtypes, enums, classes, functions (and
`functools.partial`s of them), JAX's wrapped functions, tuples/lists/dicts of those, frozen
dataclasses and submodules (recursively, a submodule reached twice marked as the same one).
Anything else (an array, a mutable object, a config object) gives None: such a definition is
not cached, never cached wrongly.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import threading
import types
import weakref
from collections.abc import Hashable, Mapping, MutableMapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.core.scope import Scope

_SCALARS = (type(None), bool, int, float, complex, str, bytes, range, type(Ellipsis))
_BY_IDENTITY: tuple[type, ...] = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    np.ufunc,
    enum.Enum,
    np.dtype,
    jax.custom_jvp,
    jax.custom_vjp,
    type(jax.jit(lambda x: x)),
)
_FIELDS: dict[type, tuple[str, ...]] = {}


class _Unsafe(Exception):
    """A value the fingerprint cannot vouch for."""


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(cls) if f.name != "parent")
        _FIELDS[cls] = names
    return names


class _Walk:
    def __init__(self) -> None:
        self.seen: dict[int, int] = {}  # id(module) -> its number in the walk
        self.keep: list[Any] = []  # the modules numbered (so that no id is reused meanwhile)
        self.containers: list[tuple[Any, tuple[Any, ...]]] = []  # mutable ones, as they were
        self.setups: dict[type, Any] = {}  # each class's setup when it was read

    def value(self, v: Any) -> Hashable:
        cls = type(v)
        if cls in _SCALARS or isinstance(v, np.generic):
            return (cls, v)
        if isinstance(v, nn.Module):
            return self.module(v)
        if isinstance(v, tuple | list):
            if not isinstance(v, tuple):
                self.containers.append((v, tuple(v)))
            return (cls, tuple(self.value(x) for x in v))
        if isinstance(v, Mapping):
            if isinstance(v, MutableMapping):
                self.containers.append((v, tuple(v.items())))
            return (cls, tuple((self.value(k), self.value(x)) for k, x in v.items()))
        if isinstance(v, _BY_IDENTITY):
            return (cls, v)
        if isinstance(v, functools.partial):
            return (cls, self.value(v.func), self.value(v.args), self.value(v.keywords))
        if isinstance(v, types.MethodType):
            return (cls, self.value(v.__func__), self.value(v.__self__))
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            if not v.__dataclass_params__.frozen:  # type: ignore[attr-defined]
                raise _Unsafe
            return (cls, tuple(self.value(getattr(v, f.name)) for f in dataclasses.fields(v)))
        raise _Unsafe

    def module(self, m: nn.Module) -> Hashable:
        number = self.seen.get(id(m))
        if number is not None:
            return ("same module as", number)
        if m.scope is not None or isinstance(m.__dict__.get("parent"), nn.Module | Scope):
            raise _Unsafe  # bound or adopted: not a definition
        self.seen[id(m)] = len(self.seen)
        self.keep.append(m)
        cls = type(m)
        setup = self.setups.setdefault(cls, cls.setup)
        fields = m.__dict__
        values = tuple(self.value(fields.get(name)) for name in _field_names(cls))
        return (cls, setup, values)


class Fingerprint:
    """A definition's fingerprint with its hash computed once (a nested tuple's is not
    cached, and a large model's takes milliseconds to hash)."""

    __slots__ = ("_hash", "value")

    def __init__(self, value: Hashable) -> None:
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Fingerprint) or self._hash != other._hash:
            return False
        return bool(self.value == other.value)

    def __repr__(self) -> str:
        return f"Fingerprint({self._hash:#x})"


def _unchanged(container: Any, snapshot: tuple[Any, ...]) -> bool:
    """Whether a list or dict still holds the same objects (by identity) as `snapshot`."""
    items = tuple(container.items()) if isinstance(container, Mapping) else tuple(container)
    if len(items) != len(snapshot):
        return False
    if isinstance(container, Mapping):
        return all(a[0] == b[0] and a[1] is b[1] for a, b in zip(items, snapshot))
    return all(a is b for a, b in zip(items, snapshot))


_Memo = tuple["weakref.ref[nn.Module]", Fingerprint, _Walk]
_MEMO: collections.OrderedDict[int, _Memo] = collections.OrderedDict()
_MEMO_LIMIT = 256
_LOCK = threading.RLock()  # re-entered by `forget` when GC runs it inside a locked block


def fingerprint(module: nn.Module) -> Fingerprint | None:
    """A hashable value equal for two definitions that register the same structure (same
    class and setup, equal fields), or None where the definition holds a value that cannot
    be vouched for.

    Remembered for the module object (the last `_MEMO_LIMIT`): a module is frozen, so its
    fingerprint changes only if a list or dict it holds does, and those are compared with
    what they held (by identity) before the remembered value is used."""
    with _LOCK:
        hit = _MEMO.get(id(module))
    if hit is not None and hit[0]() is module:
        seen = hit[2]
        if all(getattr(c, "setup", None) is s for c, s in seen.setups.items()) and all(
            _unchanged(c, snapshot) for c, snapshot in seen.containers
        ):
            return hit[1]
    walk = _Walk()
    try:
        value = Fingerprint(walk.module(module))
    except (_Unsafe, TypeError, RecursionError):
        return None
    key = id(module)

    def forget(ref: weakref.ref[nn.Module]) -> None:  # the module died: drop what it held
        with _LOCK:
            if _MEMO.get(key, (None,))[0] is ref:
                del _MEMO[key]

    try:
        ref = weakref.ref(module, forget)
    except TypeError:
        return value
    with _LOCK:
        walk.seen.clear()
        walk.keep.clear()  # the memo must not keep the submodules alive
        _MEMO[key] = (ref, value, walk)
        _MEMO.move_to_end(key)
        while len(_MEMO) > _MEMO_LIMIT:
            _MEMO.popitem(last=False)
    return value
