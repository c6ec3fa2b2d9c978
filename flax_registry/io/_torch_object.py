"""The whole object a ``torch.save`` zip file holds, without torch: ``load_torch_object``.

``open_checkpoint`` reads one flat state dict; a training checkpoint is more: ``{"model": ...,
"optimizer": {"state": {0: {...}}, "param_groups": [...]}, "scheduler": {...}, "epoch": 3,
"rng_state": <uint8 tensor>}``. ``load_torch_object`` returns that object as it was saved
(dicts, lists, tuples, numbers, strings, None), with every tensor a :class:`LazyTensor` that
is read only when asked (``np.asarray(t)``), while the returned :class:`TorchObject` is open.

Unpickling goes through the allow-list unpickler of ``open_checkpoint``, extended by the few
plain-data globals that ``torch.load(weights_only=True)`` also allows and that training
checkpoints hold: ``collections.Counter`` (``MultiStepLR.milestones``), ``set``, ``complex``,
``bytearray``, protocol-2 ``bytes`` (``_codecs.encode(str, 'latin1')``) and ``torch.Size``
(as a tuple). Nothing else is called; anything else (``numpy`` arrays, ``argparse.Namespace``)
raises :class:`ForbiddenGlobalError` before anything runs, as ``torch.load`` does by default.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._dtypes import file_view_dtype, to_native
from ._errors import (
    CLOSED,
    LEGACY_TORCH,
    NOT_FOUND,
    ZIP_BAD,
    ZIP_BAD_PICKLE,
    ZIP_BAD_TENSOR,
    ZIP_CORRUPT_ENTRY,
    ZIP_MISSING_STORAGE,
    ZIP_NO_PICKLE,
    ZIP_TORCHSCRIPT,
    ZIP_UNSUPPORTED_DTYPE,
    CheckpointError,
)
from ._lazy import LazyTensor
from ._unpickler import RestrictedUnpickler, Storage, StorageType, StoredTensor


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not bytes")
    return codecs.encode(text, "latin1")


def _size(dims: object = ()) -> tuple[int, ...]:
    if not isinstance(dims, tuple | list) or not all(isinstance(d, int) for d in dims):
        raise ValueError(f"torch.Size({dims!r}) is not a tuple of ints")
    return tuple(dims)


_EXTRA_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "Counter"): Counter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _latin1_bytes,
    ("torch", "Size"): _size,
}
"""Plain-data globals a training checkpoint holds, beyond those of a state dict."""


class _ObjectUnpickler(RestrictedUnpickler):
    def find_class(self, module: str, name: str) -> Any:
        mapped = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        mapped = (_compat_pickle.IMPORT_MAPPING.get(mapped[0], mapped[0]), mapped[1])
        if mapped in _EXTRA_GLOBALS:
            return _EXTRA_GLOBALS[mapped]
        return super().find_class(module, name)


class TorchObject:
    """An open ``torch.save`` file: ``obj`` is what was saved, tensors as ``LazyTensor``s.

    Tensors stay readable until :meth:`close` (or the end of a ``with`` block); arrays read
    from them stay valid after. Each tensor's key is its place in ``obj``
    (``"optimizer.state.0.exp_avg"``), for messages.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
            raise CheckpointError(ZIP_BAD.format(path=path, error=e)) from None
        self._closed = False
        self._tensors: dict[str, StoredTensor] = {}
        try:
            self.obj = self._load()
        except BaseException:
            self._zip.close()
            raise

    def _entry(self, name: str) -> bytes:
        try:
            return self._zip.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise CheckpointError(
                ZIP_CORRUPT_ENTRY.format(path=self.path, entry=name, problem=e)
            ) from None

    def _load(self) -> Any:
        names = self._zip.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise CheckpointError(ZIP_NO_PICKLE.format(path=self.path, found=shown or "none"))
        self._prefix = pickles[0][: -len("data.pkl")]
        if self._prefix + "constants.pkl" in names:
            raise CheckpointError(ZIP_TORCHSCRIPT.format(path=self.path))
        self._byteorder = "little"
        if self._prefix + "byteorder" in names:
            self._byteorder = self._entry(self._prefix + "byteorder").decode("ascii", "replace")
            if self._byteorder not in ("little", "big"):
                problem = f"unknown byte order {self._byteorder!r}"
                raise CheckpointError(
                    ZIP_CORRUPT_ENTRY.format(path=self.path, entry="byteorder", problem=problem)
                )
        unpickler = _ObjectUnpickler(
            self._entry(self._prefix + "data.pkl"), path=self.path, storage_loader=self._storage
        )
        try:
            raw = unpickler.load()
        except CheckpointError:
            raise
        except Exception as e:  # corrupt pickles raise anything from EOFError to TypeError
            error = f"{type(e).__name__}: {e}"
            raise CheckpointError(ZIP_BAD_PICKLE.format(path=self.path, error=error)) from None
        return self._wrap(raw, "")

    def _storage(self, key: str, storage_type: StorageType) -> Storage:
        name = f"{self._prefix}data/{key}"
        if name not in self._zip.NameToInfo:
            raise CheckpointError(ZIP_MISSING_STORAGE.format(path=self.path, key=key, entry=name))
        return Storage(key, storage_type)

    def _wrap(self, x: Any, where: str) -> Any:
        """`x` with every StoredTensor replaced by a LazyTensor keyed by its place."""
        if isinstance(x, StoredTensor):
            key = where or "<top level>"
            while key in self._tensors:  # the same tensor object saved twice
                key += "'"
            self._tensors[key] = x
            return LazyTensor(self, key, x.shape, x.dtype or np.dtype(np.uint8))
        if isinstance(x, dict):  # OrderedDict and Counter keep their type
            out = type(x)() if type(x) is not dict else {}
            for k, v in x.items():
                out[k] = self._wrap(v, f"{where}.{k}" if where else str(k))
            return out
        if isinstance(x, list):
            return [self._wrap(v, f"{where}.{i}") for i, v in enumerate(x)]
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return tuple(self._wrap(v, f"{where}.{i}") for i, v in enumerate(x))
        return x

    def read(self, key: str) -> np.ndarray:
        """The tensor at `key` as a fresh NumPy array (its storage's CRC-32 is checked)."""
        if self._closed:
            raise CheckpointError(CLOSED.format(path=self.path))
        t = self._tensors[key]
        if t.dtype is None:
            raise CheckpointError(
                ZIP_UNSUPPORTED_DTYPE.format(path=self.path, key=key, dtype=t.dtype_name)
            )
        if t.numel == 0:
            return np.empty(t.shape, dtype=t.dtype)
        name = f"{self._prefix}data/{t.storage.key}"
        raw = np.frombuffer(self._entry(name), dtype=np.uint8)
        view_dtype = file_view_dtype(t.dtype, self._byteorder)
        last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
        if (last + 1) * view_dtype.itemsize > raw.size:
            problem = (
                f"shape {t.shape}, stride {t.stride} and offset {t.offset} reach byte "
                f"{(last + 1) * view_dtype.itemsize}, but the storage holds {raw.size} bytes"
            )
            raise CheckpointError(
                ZIP_BAD_TENSOR.format(path=self.path, entry=name, problem=problem)
            )
        itemsize = view_dtype.itemsize
        opaque = np.dtype((np.void, itemsize))  # as_strided loses ml_dtypes types: stride bytes
        base = raw[: raw.size - raw.size % itemsize].view(opaque)[t.offset :]
        strides = tuple(s * itemsize for s in t.stride)
        view = as_strided(base, shape=t.shape, strides=strides, writeable=False).view(view_dtype)
        return to_native(np.array(view, copy=True, order="C"), t.dtype)

    def read_slice(self, key: str, index: Any) -> np.ndarray:
        return np.ascontiguousarray(self.read(key)[index])

    @property
    def num_tensors(self) -> int:
        return len(self._tensors)

    def close(self) -> None:
        """Close the file; LazyTensors of `obj` can no longer be read (arrays stay valid)."""
        self._closed = True
        self._zip.close()

    def __enter__(self) -> TorchObject:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._tensors)} tensors"
        return f"TorchObject({str(self.path)!r}, {state})"


def load_torch_object(path: str | PathLike[str]) -> TorchObject:
    """Open a ``torch.save`` zip file and unpickle the whole object it holds, without torch.

    Differs from ``torch.load(path, weights_only=True)``: no torch needed and tensors are
    :class:`LazyTensor`s (NumPy on read, bfloat16/float8 as ``ml_dtypes``) instead of tensors;
    the allowlist is the one above (no ``torch.device``, sparse, quantized or subclassed
    tensors). Use it as a context manager: tensors are readable while it is open.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(NOT_FOUND.format(path=p))
    with open(p, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":
        raise CheckpointError(LEGACY_TORCH.format(path=p))
    return TorchObject(p)
