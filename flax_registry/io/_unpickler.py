"""Unpickling ``data.pkl`` of a PyTorch zip checkpoint without torch and without running code.

:mod:`._pickle_vm` interprets the opcodes; this module supplies what they may reach: an
allowlist of globals, each resolved to a local stand-in. The tensor rebuild functions return
:class:`StoredTensor` records (storage key, dtype, offset, shape, stride) instead of tensors,
storage classes and dtypes become inert markers, and ``collections.OrderedDict`` is the real
(data-only) class. Any other global raises :class:`ForbiddenGlobalError` before it is called,
so nothing in the file is ever executed.

The stand-ins check their arguments as torch's rebuild functions do (same signatures,
``requires_grad`` must be a bool and may be True only for floating/complex tensors), and a
storage key keeps the element type of its first reference, as ``torch.load`` does.

Compared with ``torch.load(weights_only=True)``: the allowlist is smaller (no ``torch.Size``,
``torch.device``, sparse/quantized tensors or tensor subclasses), and tensors are not
materialized; their bytes are read later, on demand.
"""

from __future__ import annotations

import codecs
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from pickle import UnpicklingError
from typing import Any, NamedTuple

import numpy as np

from ._dtypes import TORCH_DTYPE_TO_NUMPY, TORCH_STORAGE_TO_NUMPY
from ._errors import (
    FORBIDDEN_GLOBAL,
    ZIP_BAD_PICKLE,
    CheckpointError,
    ForbiddenGlobalError,
    describe_error,
    short_repr,
)
from ._pickle_vm import KeyGuard, PickleVM, decode_ascii

# Every object the unpickler hands to data.pkl is a NamedTuple: immutable, without __dict__ or
# __setstate__, so nothing the file does can alter a stand-in shared between loads.


class StorageType(NamedTuple):
    """Stand-in for ``torch.FloatStorage`` & co. (``dtype`` None: ``TypedStorage``, which
    torch cannot load a storage of either)."""

    name: str
    dtype: np.dtype | None


class TorchDtype(NamedTuple):
    """Stand-in for a ``torch.<dtype>`` global (``numpy`` None: no NumPy equivalent)."""

    name: str
    numpy: np.dtype | None


class Storage(NamedTuple):
    """A storage referenced by ``persistent_load``: archive entry ``data/<key>`` of ``nbytes``."""

    key: str
    type: StorageType
    nbytes: int


class _Call(NamedTuple):
    """An allowed callable, wrapped so nothing in the file can reach the function's attributes."""

    fn: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class StoredTensor(NamedTuple):
    """What a tensor in ``data.pkl`` unpickles to: where its elements are, not the elements.

    ``offset`` and ``stride`` count elements of ``dtype``, as in ``torch.Tensor.set_``.
    ``dtype`` is None for torch dtypes NumPy cannot represent (``dtype_name`` says which).
    """

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype | None
    dtype_name: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _BadData(ValueError):
    """data.pkl called an allowed stand-in with arguments torch.load refuses too."""


def _int_tuple(x: object, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple | list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in x
    ):
        raise _BadData(f"{what} is {short_repr(x)}, expected a tuple of ints")
    return tuple(x)


def _is_float(dtype_name: str) -> bool:
    """torch's ``is_floating_point() or is_complex()``, from the dtype's name."""
    return dtype_name.removeprefix("torch.").startswith(("float", "bfloat", "complex"))


def _check_requires_grad(requires_grad: object, is_float: bool) -> None:
    if not isinstance(requires_grad, bool):
        raise _BadData(f"requires_grad must be a bool, found {short_repr(requires_grad)}")
    if requires_grad and not is_float:
        raise _BadData("only Tensors of floating point and complex dtype can require gradients")


def _make_tensor(
    storage: object, offset: object, size: object, stride: object, dtype: TorchDtype | None
) -> StoredTensor:
    if not isinstance(storage, Storage):
        raise _BadData(f"tensor storage is {type(storage).__name__}, expected a persistent storage")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise _BadData(f"storage offset is {short_repr(offset)}")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides) or any(d < 0 for d in shape) or any(s < 0 for s in strides):
        raise _BadData(f"size {short_repr(shape)} and stride {short_repr(strides)} do not match")
    if dtype is None:  # the storage's element type (uint8 for an UntypedStorage)
        np_dtype = storage.type.dtype
        assert np_dtype is not None  # persistent_load refuses TypedStorage
        return StoredTensor(storage, offset, shape, strides, np_dtype, str(np_dtype))
    return StoredTensor(storage, offset, shape, strides, dtype.numpy, dtype.name)


def _rebuild_tensor(storage: object, storage_offset: object, size: object, stride: object) -> Any:
    return _make_tensor(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    metadata: object = None,
) -> StoredTensor:
    tensor = _make_tensor(storage, storage_offset, size, stride, None)
    _check_requires_grad(requires_grad, _is_float(tensor.dtype_name))
    if metadata:
        raise _BadData(f"tensor metadata {short_repr(metadata)} is not supported")
    return tensor


def _rebuild_tensor_v3(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    dtype: object,
    metadata: object = None,
) -> StoredTensor:
    if not isinstance(dtype, TorchDtype):
        raise _BadData(f"tensor dtype is {short_repr(dtype)}, expected a torch dtype")
    _check_requires_grad(requires_grad, _is_float(dtype.name))
    tensor = _make_tensor(storage, storage_offset, size, stride, dtype)
    if metadata:
        raise _BadData(f"tensor metadata {short_repr(metadata)} is not supported")
    return tensor


def _rebuild_parameter(data: object, requires_grad: object, backward_hooks: object) -> Any:
    # A Parameter is stored as its data tensor; requires_grad/hooks are checked, then dropped.
    if not isinstance(data, StoredTensor):
        raise _BadData(f"parameter data is {type(data).__name__}, expected a tensor")
    _check_requires_grad(requires_grad, _is_float(data.dtype_name))
    return data


# Attributes whose assignment changes (or cannot change) a Parameter's data in torch; a state
# that sets one is refused rather than ignored.
_TENSOR_ATTRIBUTES = frozenset(
    "data grad requires_grad real imag names retains_grad shape dtype device layout is_leaf "  # noqa: SIM905
    "ndim T mT H mH grad_fn _base _cdata _grad _grad_fn _version _backward_hooks __class__ "
    "__dict__".split()
)


def _check_state_dict(state: object) -> None:
    if not state:
        return
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise _BadData(f"parameter state {short_repr(state)} is not a dict of attributes")
    if touched := sorted(_TENSOR_ATTRIBUTES.intersection(state)):
        raise _BadData(f"parameter state sets tensor attribute(s) {touched}")


def _rebuild_parameter_with_state(
    data: object, requires_grad: object, backward_hooks: object, state: object
) -> Any:
    tensor = _rebuild_parameter(data, requires_grad, backward_hooks)
    if isinstance(state, tuple):
        if len(state) != 2:
            raise _BadData(f"Invalid serialized state: {short_repr(state)}")
        _check_state_dict(state[0])
        _check_state_dict(state[1])
    else:
        _check_state_dict(state)
    return tensor


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not bytes")
    return codecs.encode(text, "latin1")


def _size(dims: object = ()) -> tuple[int, ...]:
    if not isinstance(dims, tuple | list) or not all(isinstance(d, int) for d in dims):
        raise ValueError(f"torch.Size({dims!r}) is not a tuple of ints")
    return tuple(dims)


_PLAIN_DATA: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "Counter"): Counter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _latin1_bytes,
    ("torch", "Size"): _size,
}
"""Plain-data globals that `torch.load(weights_only=True)` allows too and that training
checkpoints hold (`MultiStepLR.milestones` is a Counter), beyond those of a state dict."""


def _allowlist() -> dict[tuple[str, str], object]:
    """torch's weights-only allowlist, restricted to what has a stand-in here."""
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _Call(_rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): _Call(_rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3"): _Call(_rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): _Call(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _Call(_rebuild_parameter_with_state),
        ("torch.storage", "UntypedStorage"): StorageType("UntypedStorage", np.dtype(np.uint8)),
        ("torch.storage", "TypedStorage"): StorageType("TypedStorage", None),
    }
    for key, fn in _PLAIN_DATA.items():
        allowed[key] = _Call(fn)
    for name, dtype in TORCH_STORAGE_TO_NUMPY.items():
        allowed["torch", name] = StorageType(name, dtype)
    for name, numpy in TORCH_DTYPE_TO_NUMPY.items():
        allowed["torch", name] = TorchDtype(f"torch.{name}", numpy)
    return allowed


ALLOWED_GLOBALS: dict[tuple[str, str], object] = _allowlist()
"""``(module, name)`` -> local stand-in: the only globals ``data.pkl`` may reference."""


def _pairs(items: Iterable[Any]) -> Iterable[tuple[Any, Any]]:
    """``dict.update``'s reading of a sequence of pairs (its errors included)."""
    for i, item in enumerate(items):
        pair = list(item)
        if len(pair) != 2:
            raise ValueError(
                f"dictionary update sequence element #{i} has length {len(pair)}; 2 is required"
            )
        yield pair[0], pair[1]


class TorchHooks:
    """The :class:`~._pickle_vm.Hooks` of a torch checkpoint: the allowlist, the stand-ins, and
    ``storage_loader(key, storage_type, numel)`` for each ``('storage', type, key, location,
    numel)`` persistent id (it checks that the archive holds ``data/<key>`` of that size)."""

    def __init__(
        self,
        path: Path,
        keys: KeyGuard,
        storage_loader: Callable[[str, StorageType, int], Storage],
        extra_globals: Mapping[tuple[str, str], Callable[..., Any]] | None = None,
    ) -> None:
        self._path = path
        self._keys = keys
        self._storage_loader = storage_loader
        self._storages: dict[str, Storage] = {}
        self._extra = {k: _Call(fn) for k, fn in (extra_globals or {}).items()}

    def find_class(self, module: str, name: str) -> Any:
        stand_in = self._extra.get((module, name)) or ALLOWED_GLOBALS.get((module, name))
        if stand_in is None:
            qualified = f"{module}.{name}"
            raise ForbiddenGlobalError(
                FORBIDDEN_GLOBAL.format(path=self._path, name=short_repr(qualified, 120)[1:-1]),
                global_name=qualified,
            )
        return stand_in

    def _ordered_dict(self, *args: Any) -> OrderedDict[Any, Any]:
        if len(args) > 1:
            raise TypeError(f"expected at most 1 argument, got {len(args)}")
        out: OrderedDict[Any, Any] = OrderedDict()
        if args:
            source = args[0]
            items = source.items() if isinstance(source, dict) else _pairs(source)
            for k, v in items:
                self._keys.setitem(out, k, v)
        return out

    def reduce(self, func: Any, args: Any) -> Any:
        if func is OrderedDict:
            return self._ordered_dict(*args)
        if isinstance(func, _Call):
            return func(*args)
        raise UnpicklingError(f"Trying to call reduce for unrecognized function {short_repr(func)}")

    def new_object(self, cls: Any, args: Any) -> Any:
        if cls is OrderedDict:
            tuple(args)  # cls.__new__(cls, *args) ignores them, but unpacks them
            return OrderedDict()
        raise UnpicklingError(f"Can only create new object for OrderedDict, got {short_repr(cls)}")

    def build(self, inst: Any, state: Any) -> None:
        # torch does `inst.__dict__.update(state)` for an OrderedDict (that is where a state
        # dict's `_metadata` goes). Only the checks are kept: attributes set on the instance
        # would shadow its methods (`items`), and `_metadata` is not used.
        if type(inst) is not OrderedDict:
            raise AttributeError(
                f"'{type(inst).__name__}' object cannot be built: BUILD sets attributes, which "
                "only an OrderedDict accepts"
            )
        if not isinstance(state, dict):
            for key, _ in _pairs(state):
                self._keys.check(key)

    def persistent_load(self, pid: Any) -> Storage:
        if not isinstance(pid, tuple):
            raise _BadData(f"persistent id must be a tuple, found {short_repr(pid)}")
        if len(pid) != 5:
            raise _BadData(f"unsupported persistent id {short_repr(pid)}")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, StorageType) or storage_type.dtype is None:
            raise _BadData(f"unsupported storage type in persistent id {short_repr(pid)}")
        if not isinstance(key, str):
            raise _BadData(f"storage key is {short_repr(key)}, expected a str")
        if key in self._storages:
            return self._storages[key]  # the first reference's element type wins, as in torch
        decode_ascii(location)
        if not isinstance(numel, int):
            raise _BadData(f"storage size is {short_repr(numel)}, expected an int")
        storage = self._storage_loader(key, storage_type, numel)
        if storage.nbytes:  # torch caches only storages with data
            self._storages[key] = storage
        return storage


def unpickle(
    data: bytes,
    *,
    path: Path,
    storage_loader: Callable[[str, StorageType, int], Storage],
    extra_globals: Mapping[tuple[str, str], Callable[..., Any]] | None = None,
) -> Any:
    """Unpickle ``data`` (see the module docstring); CheckpointError on any failure.
    ``extra_globals`` allows more plain-data callables (a training checkpoint's)."""
    try:
        keys = KeyGuard.for_pickle(data)
        hooks = TorchHooks(path, keys, storage_loader, extra_globals)
        return PickleVM(data, hooks, keys=keys).load()
    except CheckpointError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # corrupt pickles raise anything from EOFError to TypeError
        raise CheckpointError(ZIP_BAD_PICKLE.format(path=path, error=describe_error(e))) from None
