"""A pickle interpreter for ``data.pkl``: the opcodes ``torch.load(weights_only=True)`` runs, with
its semantics, and limits that keep a small crafted pickle from crashing or hanging the process.

Python's ``pickle.Unpickler`` is not used: it accepts opcodes torch refuses (so files torch does
not load would load here), preallocates its memo up to any ``LONG_BINPUT`` index (618 bytes can
take 511 MB), and hashes dict keys without bounds (a 300,000-deep tuple key overflows the C stack
while hashing; a 59-level tuple DAG takes ~2**59 steps). Here:

- the opcode set and each opcode's checks are those of torch's ``_weights_only_unpickler``
  (protocol 2, what ``torch.save`` writes); any other opcode is refused, as torch refuses it;
- the memo is a dict (its size is bounded by the number of ``PUT`` opcodes, hence by the file);
- before a value becomes a dict key its hashing cost is measured without recursion (tuples are
  immutable, so each one is measured once): a key of more than :data:`MAX_KEY_NODES` elements or
  :data:`MAX_KEY_DEPTH` levels, or more than a budget proportional to the file in total, is
  refused instead of being hashed;
- everything with side effects (globals, ``REDUCE``, ``NEWOBJ``, ``BUILD``, persistent ids) is
  delegated to :class:`Hooks`, which only ever return inert stand-ins.

Errors are raised as ordinary exceptions (``UnpicklingError``, ``EOFError``, ``KeyError``, ...);
the caller turns every one of them into a :class:`~flax_registry.io.CheckpointError`.
"""

from __future__ import annotations

import _compat_pickle
import struct
import sys
from collections import OrderedDict
from pickle import UnpicklingError, decode_long
from typing import Any, Protocol

MAX_KEY_NODES = 10_000
"""Most tuple elements (counted as hashing visits them, shared ones repeatedly) in one dict key."""
MAX_KEY_DEPTH = 100
"""Most levels of tuple nesting in one dict key."""

_INT4 = struct.Struct("<i")
_UINT2 = struct.Struct("<H")
_UINT4 = struct.Struct("<I")
_FLOAT8 = struct.Struct(">d")


class Hooks(Protocol):
    """What the interpreter delegates: every opcode that could reach code."""

    def find_class(self, module: str, name: str) -> Any: ...

    def persistent_load(self, pid: Any) -> Any: ...

    def reduce(self, func: Any, args: Any) -> Any: ...

    def new_object(self, cls: Any, args: Any) -> Any: ...

    def build(self, inst: Any, state: Any) -> None: ...


def decode_ascii(x: Any) -> Any:
    """torch's ``_maybe_decode_ascii``: bytes become str (strictly ASCII); anything else as is."""
    return x.decode("ascii") if isinstance(x, bytes) else x


class KeyGuard:
    """Measures what hashing a value costs before it is used as a dict key (see module doc)."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._tuples: dict[int, tuple[tuple[Any, ...], int, int]] = {}  # id -> (pin, size, depth)

    @classmethod
    def for_pickle(cls, data: bytes) -> KeyGuard:
        """A guard whose total budget grows with the pickle (legitimate keys cost 1 each)."""
        return cls(budget=1_000_000 + 64 * len(data))

    def _measure(self, root: tuple[Any, ...]) -> tuple[int, int] | None:
        """``(elements, levels)`` of ``root`` as hashing visits them, or None beyond the limits
        (found after at most :data:`MAX_KEY_NODES` steps, however deep or shared the tuple)."""
        cached = self._tuples.get(id(root))
        if cached is not None:
            return cached[1], cached[2]
        size, levels = 0, 0
        pending: list[tuple[tuple[Any, ...], int]] = [(root, 1)]
        while pending:
            node, depth = pending.pop()
            size += 1
            levels = max(levels, depth)
            if depth > MAX_KEY_DEPTH:
                return None
            for child in node:
                size += 1
                if size > MAX_KEY_NODES:
                    return None
                if isinstance(child, tuple):
                    size -= 1  # counted when it is popped
                    pending.append((child, depth + 1))
        self._tuples[id(root)] = (root, size, levels)  # pinned: its id stays its own
        return size, levels

    def check(self, key: Any) -> None:
        """Raise ``UnpicklingError`` if hashing ``key`` could take unbounded time or stack."""
        if not isinstance(key, tuple):
            return  # str/int/float/None/bytes hash in bounded time; containers are unhashable
        measured = self._measure(key)
        if measured is None:
            raise UnpicklingError(
                f"a dict key is a tuple of more than {MAX_KEY_NODES} elements or "
                f"{MAX_KEY_DEPTH} levels (hashing it could take unbounded time or stack)"
            )
        self._budget -= measured[0]
        if self._budget < 0:
            raise UnpicklingError("the dict keys of this pickle take too long to hash")

    def setitem(self, target: dict[Any, Any], key: Any, value: Any) -> None:
        self.check(key)
        target[key] = value


class PickleVM:
    """Runs one pickle (see the module docstring); ``load()`` returns the unpickled object."""

    def __init__(
        self, data: bytes, hooks: Hooks, *, keys: KeyGuard | None = None, encoding: str = "utf-8"
    ) -> None:
        self._raw = bytes(data)
        self._data = memoryview(self._raw)
        self._pos = 0
        self._hooks = hooks
        self._encoding = encoding
        self.keys = keys or KeyGuard.for_pickle(data)
        self._stack: list[Any] = []
        self._metastack: list[list[Any]] = []
        self._memo: dict[int, Any] = {}
        self._dispatch = {
            ord(k): v
            for k, v in {
                "c": self._global,
                "\x81": self._newobj,
                "R": self._reduce,
                "b": self._build,
                "a": self._append,
                "e": self._appends,
                "s": self._setitem,
                "u": self._setitems,
                "(": self._mark,
                "t": self._tuple,
                "\x85": lambda: self._tuple_n(1),
                "\x86": lambda: self._tuple_n(2),
                "\x87": lambda: self._tuple_n(3),
                "N": lambda: self._stack.append(None),
                "\x89": lambda: self._stack.append(False),
                "\x88": lambda: self._stack.append(True),
                ")": lambda: self._stack.append(()),
                "]": lambda: self._stack.append([]),
                "}": lambda: self._stack.append({}),
                "\x8f": lambda: self._stack.append(set()),
                "J": lambda: self._stack.append(_INT4.unpack(self._read(4))[0]),
                "K": lambda: self._stack.append(self._read(1)[0]),
                "M": lambda: self._stack.append(_UINT2.unpack(self._read(2))[0]),
                "G": lambda: self._stack.append(_FLOAT8.unpack(self._read(8))[0]),
                "X": self._binunicode,
                "U": self._short_binstring,
                "Q": self._binpersid,
                "h": lambda: self._stack.append(self._memo[self._read(1)[0]]),
                "j": lambda: self._stack.append(self._memo[_UINT4.unpack(self._read(4))[0]]),
                "q": lambda: self._put(self._read(1)[0]),
                "r": lambda: self._put(_UINT4.unpack(self._read(4))[0]),
                "\x8a": lambda: self._stack.append(decode_long(self._read(self._read(1)[0]))),
                "\x80": lambda: self._read(1),  # PROTO: any version, as torch
            }.items()
        }

    # -- reading ------------------------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise EOFError(f"pickle data was truncated (needed {n} bytes at {self._pos})")
        chunk = bytes(self._data[self._pos : end])
        self._pos = end
        return chunk

    def _readline(self) -> bytes:
        """Up to and including the next newline, or to the end (as ``BytesIO.readline``)."""
        end = self._raw.find(b"\n", self._pos)
        end = len(self._raw) if end < 0 else end + 1
        line = self._raw[self._pos : end]
        self._pos = end
        return line

    def load(self) -> Any:
        stop = ord(".")
        while True:
            if self._pos >= len(self._data):
                raise EOFError("pickle data ended without a STOP opcode")
            op = self._data[self._pos]
            self._pos += 1
            if op == stop:
                return self._stack.pop()
            handler = self._dispatch.get(op)
            if handler is None:
                raise UnpicklingError(f"Unsupported operand {op} at byte {self._pos - 1}")
            handler()

    # -- opcodes ------------------------------------------------------------------------------

    def _global(self) -> None:
        module = self._readline()[:-1].decode("utf-8")
        name = self._readline()[:-1].decode("utf-8")
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        self._stack.append(self._hooks.find_class(module, name))

    def _newobj(self) -> None:
        args = self._stack.pop()
        cls = self._stack.pop()
        self._stack.append(self._hooks.new_object(cls, args))

    def _reduce(self) -> None:
        args = self._stack.pop()
        self._stack[-1] = self._hooks.reduce(self._stack[-1], args)

    def _build(self) -> None:
        state = self._stack.pop()
        self._hooks.build(self._stack[-1], state)

    def _append(self) -> None:
        item = self._stack.pop()
        target = self._stack[-1]
        if type(target) is not list:
            raise UnpicklingError(f"Can only append to lists, but got {type(target).__name__}")
        target.append(item)

    def _appends(self) -> None:
        items = self._pop_mark()
        target = self._stack[-1]
        if type(target) is not list:
            raise UnpicklingError(f"Can only extend lists, but got {type(target).__name__}")
        target.extend(items)

    def _dict_target(self, opcode: str) -> dict[Any, Any]:
        target = self._stack[-1]
        if type(target) not in (dict, OrderedDict):
            raise UnpicklingError(
                f"Can only {opcode} for dict or collections.OrderedDict, but got "
                f"{type(target).__name__}"
            )
        return target  # type: ignore[no-any-return]

    def _setitem(self) -> None:
        value = self._stack.pop()
        key = self._stack.pop()
        self.keys.setitem(self._dict_target("SETITEM"), key, value)

    def _setitems(self) -> None:
        items = self._pop_mark()
        target = self._dict_target("SETITEMS")
        for i in range(0, len(items), 2):
            self.keys.setitem(target, items[i], items[i + 1])  # odd count: IndexError, as torch

    def _mark(self) -> None:
        self._metastack.append(self._stack)
        self._stack = []

    def _pop_mark(self) -> list[Any]:
        items = self._stack
        self._stack = self._metastack.pop()
        return items

    def _tuple(self) -> None:
        items = tuple(self._pop_mark())  # first: it replaces self._stack
        self._stack.append(items)

    def _tuple_n(self, n: int) -> None:
        if len(self._stack) < n:
            raise IndexError("TUPLE opcode on a too short stack")
        items = tuple(self._stack[len(self._stack) - n :])
        del self._stack[len(self._stack) - n :]
        self._stack.append(items)

    def _binunicode(self) -> None:
        (n,) = _UINT4.unpack(self._read(4))
        if n > sys.maxsize:
            raise UnpicklingError("String is too long")
        self._stack.append(str(self._read(n), "utf-8", "surrogatepass"))

    def _short_binstring(self) -> None:
        data = self._read(self._read(1)[0])
        self._stack.append(data.decode(self._encoding, "strict"))

    def _binpersid(self) -> None:
        pid = self._stack.pop()
        if type(pid) is not tuple and type(pid) is not int:
            raise UnpicklingError(
                f"persistent_load id must be tuple or int, but got {type(pid).__name__}"
            )
        if type(pid) is tuple and len(pid) > 0 and decode_ascii(pid[0]) != "storage":
            raise UnpicklingError(
                f"Only persistent_load of storage is allowed, but got {type(pid[0]).__name__}"
            )
        self._stack.append(self._hooks.persistent_load(pid))

    def _put(self, index: int) -> None:
        self._memo[index] = self._stack[-1]
