"""A restricted unpickler for the ``data.pkl`` inside PyTorch zip checkpoints, without torch.

``find_class`` resolves only an allowlist of globals, each to a local stand-in: the tensor
rebuild functions return :class:`StoredTensor` records (storage key, dtype, offset, shape,
stride) instead of tensors, storage classes and dtypes become inert markers, and
``collections.OrderedDict`` is the real (data-only) class. Any other global raises
:class:`ForbiddenGlobalError` before it is called, so nothing in the file is ever executed.

Compared with ``torch.load(weights_only=True)``: the allowlist is smaller (no ``torch.Size``,
``torch.device``, sparse/quantized tensors or tensor subclasses), and tensors are not
materialized; their bytes are read later, on demand.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ._dtypes import TORCH_DTYPE_TO_NUMPY, TORCH_STORAGE_TO_NUMPY
from ._errors import FORBIDDEN_GLOBAL, ZIP_BAD_PICKLE, CheckpointError, ForbiddenGlobalError

# Every object the unpickler hands to data.pkl is a NamedTuple: immutable, without __dict__ or
# __setstate__, so the pickle BUILD opcode cannot alter a stand-in shared between loads.


class StorageType(NamedTuple):
    """Stand-in for ``torch.FloatStorage`` & co. (``dtype`` None: ``UntypedStorage``)."""

    name: str
    dtype: np.dtype | None


class TorchDtype(NamedTuple):
    """Stand-in for a ``torch.<dtype>`` global (``numpy`` None: no NumPy equivalent)."""

    name: str
    numpy: np.dtype | None


class Storage(NamedTuple):
    """A storage referenced by ``persistent_load``: archive entry ``data/<key>``."""

    key: str
    type: StorageType


class _Call(NamedTuple):
    """An allowed callable, wrapped so BUILD cannot reach the function's attributes."""

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
    """data.pkl called an allowed stand-in with arguments torch.save never writes."""


def _int_tuple(x: object, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple | list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in x
    ):
        raise _BadData(f"{what} is {x!r}, expected a tuple of ints")
    return tuple(x)


def _make_tensor(
    storage: object, offset: object, size: object, stride: object, dtype: TorchDtype | None
) -> StoredTensor:
    if not isinstance(storage, Storage):
        raise _BadData(f"tensor storage is {type(storage).__name__}, expected a persistent storage")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise _BadData(f"storage offset is {offset!r}")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides) or any(d < 0 for d in shape) or any(s < 0 for s in strides):
        raise _BadData(f"size {shape} and stride {strides} do not describe a tensor")
    if dtype is None:
        if storage.type.dtype is None:
            raise _BadData("an UntypedStorage tensor was rebuilt without a dtype")
        return StoredTensor(storage, offset, shape, strides, storage.type.dtype, storage.type.name)
    return StoredTensor(storage, offset, shape, strides, dtype.numpy, dtype.name)


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object) -> StoredTensor:
    return _make_tensor(storage, offset, size, stride, None)


def _rebuild_tensor_v2(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> StoredTensor:
    return _make_tensor(storage, offset, size, stride, None)


def _rebuild_tensor_v3(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    dtype: object,
    metadata: object = None,
) -> StoredTensor:
    if not isinstance(dtype, TorchDtype):
        raise _BadData(f"tensor dtype is {dtype!r}, expected a torch dtype")
    return _make_tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(
    data: object, requires_grad: object = True, backward_hooks: object = None, state: object = None
) -> StoredTensor:
    # A Parameter is stored as its data tensor; requires_grad/hooks/attributes are dropped.
    if not isinstance(data, StoredTensor):
        raise _BadData(f"parameter data is {type(data).__name__}, expected a tensor")
    return data


def _allowlist() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _Call(_rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): _Call(_rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3"): _Call(_rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): _Call(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _Call(_rebuild_parameter),
    }
    for name in ("UntypedStorage", "TypedStorage"):
        allowed["torch.storage", name] = StorageType(name, None)
        allowed["torch", name] = StorageType(name, None)
    for name, dtype in TORCH_STORAGE_TO_NUMPY.items():
        allowed["torch", name] = StorageType(name, dtype)
    for name, numpy in TORCH_DTYPE_TO_NUMPY.items():
        allowed["torch", name] = TorchDtype(f"torch.{name}", numpy)
    return allowed


ALLOWED_GLOBALS: dict[tuple[str, str], object] = _allowlist()
"""``(module, name)`` -> local stand-in: the only globals ``data.pkl`` may reference."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals are the stand-ins in :data:`ALLOWED_GLOBALS`.

    ``storage_loader(key, storage_type)`` resolves each ``('storage', type, key, location,
    numel)`` persistent id (it checks that the archive holds ``data/<key>``).
    """

    def __init__(
        self,
        data: bytes,
        *,
        path: Path,
        storage_loader: Callable[[str, StorageType], Storage],
    ) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._path = path
        self._storage_loader = storage_loader

    def find_class(self, module: str, name: str) -> Any:
        # protocol 0-2 pickles spell Python 3 modules the Python 2 way (`__builtin__`)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        stand_in = ALLOWED_GLOBALS.get((module, name))
        if stand_in is None:
            qualified = f"{module}.{name}"
            raise ForbiddenGlobalError(
                FORBIDDEN_GLOBAL.format(path=self._path, name=qualified), global_name=qualified
            )
        return stand_in

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _BadData(f"unsupported persistent id {pid!r:.200}")
        _, storage_type, key, _location, _numel = pid
        if not isinstance(storage_type, StorageType) or not isinstance(key, str):
            raise _BadData(f"unsupported storage reference {pid!r:.200}")
        return self._storage_loader(key, storage_type)


def unpickle(
    data: bytes, *, path: Path, storage_loader: Callable[[str, StorageType], Storage]
) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; CheckpointError on any failure."""
    try:
        return RestrictedUnpickler(data, path=path, storage_loader=storage_loader).load()
    except CheckpointError:
        raise
    except Exception as e:  # corrupt pickles raise anything from EOFError to TypeError
        raise CheckpointError(
            ZIP_BAD_PICKLE.format(path=path, error=f"{type(e).__name__}: {e}")
        ) from None
