"""Reading PyTorch zip checkpoints (``torch.save``'s default format) without importing torch.

:mod:`._archive` opens the zip as torch's reader would, ``data.pkl`` goes through
:mod:`._unpickler` (an allowlist; nothing is executed), and :mod:`._layout` checks every
tensor's shape, strides and offset against its storage. Storages are stored uncompressed in
the archive, so each tensor is a strided NumPy view of the memory-mapped file at the storage's
data offset (found from the zip local header); reads copy only the selected elements.

Everything that parses the file runs inside :func:`._archive.guarded`, so a malformed file
raises :class:`CheckpointError` naming it, never another exception type. The records torch
reads and checks are read and checked too (``version`` from 1 to 10, ``byteorder``,
``.storage_alignment``, each storage's size against its persistent id), so a file torch
refuses is refused here, and every tensor has the dtype torch gives it.

Differs from ``torch.load(path, weights_only=True, map_location="cpu", mmap=True)``: no
torch, arrays instead of tensors, a nested checkpoint must name the state dict with
``entry``, storage CRCs are checked on whole-tensor reads (torch checks none), and a
duplicated entry name is refused. A re-zipped (deflated) archive still loads, but each read
then decompresses its whole storage.
"""

from __future__ import annotations

import functools
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._archive import ZipArchive, guarded
from ._dtypes import file_view_dtype
from ._errors import (
    ZIP_BAD_TENSOR,
    ZIP_BAD_VERSION,
    ZIP_CORRUPT_ENTRY,
    ZIP_MISSING_STORAGE,
    ZIP_NO_PICKLE,
    ZIP_NO_VERSION,
    ZIP_RECORD_SIZE,
    ZIP_TORCHSCRIPT,
    ZIP_UNSUPPORTED_DTYPE,
    CheckpointError,
    missing_key_message,
    short_repr,
)
from ._fast_read import read_whole
from ._layout import byte_strides, strided_problem
from ._mapped import Extent, MappedFile, copy_out, native_view, normalize_index
from ._state_dict import select_state_dict
from ._unpickler import Storage, StorageType, StoredTensor, unpickle

VERSIONS = (1, 10)
"""The archive format versions torch 2.x reads (``kMinSupportedFileFormatVersion`` ..
``kMaxSupportedFileFormatVersion``)."""


def parse_version(raw: bytes) -> int | None:
    """The record's value as C++ ``std::stoull`` reads it (leading blanks, a sign, digits; the
    rest ignored; a minus sign wraps around), or None where stoull throws."""
    text = raw.lstrip(b" \t\n\v\f\r")
    negative = text[:1] == b"-"
    if text[:1] in (b"-", b"+"):
        text = text[1:]
    digits = len(text) - len(text.lstrip(b"0123456789"))
    if not digits or digits > 20 or int(text[:digits]) >= 2**64:
        return None
    value = int(text[:digits])
    return (-value) % 2**64 if negative else value


def _contiguous_strides(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """`stride` where it is C-contiguous for `shape` (a dimension of size 1 may have any
    stride); anything else where it is not."""
    out: list[int] = []
    step = 1
    for d, s in zip(reversed(shape), reversed(stride)):
        out.append(s if d == 1 else step)
        step *= d
    return tuple(reversed(out))


class TorchZipFile:
    """One open ``torch.save`` zip archive (the :class:`TensorFile` backend for .pt/.pth/.bin)."""

    def __init__(
        self,
        path: Path,
        *,
        entry: str | None = None,
        whole: Callable[[Any, Callable[[str, StoredTensor], None]], Any] | None = None,
        extra_globals: Mapping[tuple[str, str], Callable[..., Any]] | None = None,
    ) -> None:
        """`whole`, when given, receives the whole unpickled object and a function that
        registers a tensor under a key (`io._torch_object`); its result is `self.obj`."""
        self.path = path
        self.metadata: dict[str, str] = {}
        self._map = MappedFile(path)
        self._archive = ZipArchive(path)
        self._whole = whole
        self._extra_globals = extra_globals
        try:
            with guarded(path):
                self._init(entry)
        except BaseException:
            self._archive.close()
            raise

    def _record(self, name: str) -> zipfile.ZipInfo | None:
        return self._archive.entries.get(f"{self._prefix}/{name}")

    def _read_record(self, name: str) -> bytes:
        info = self._record(name)
        assert info is not None
        return self._archive.read(info)

    def _init(self, entry: str | None) -> None:
        infos = self._archive.infos
        first = infos[0].filename if infos else ""
        # torch's reader takes the folder of the archive's first entry as the checkpoint's root
        self._prefix = first.split("/", 1)[0]
        if "/" not in first or self._record("data.pkl") is None:
            names = [i.filename for i in infos]
            shown = ", ".join(map(repr, names[:10])) + (", ..." if len(names) > 10 else "")
            raise CheckpointError(ZIP_NO_PICKLE.format(path=self.path, found=shown or "none"))
        stray = next(
            (i.filename for i in infos if not i.filename.startswith(self._prefix + "/")), None
        )
        if stray is not None:
            raise CheckpointError(
                ZIP_CORRUPT_ENTRY.format(
                    path=self.path,
                    entry=stray,
                    problem=f"it is outside the archive's folder '{self._prefix}/' (torch.load "
                    "refuses such an archive)",
                )
            )
        if self._record("constants.pkl") is not None or any(
            i.filename.startswith(f"{self._prefix}/code/") for i in infos
        ):
            raise CheckpointError(ZIP_TORCHSCRIPT.format(path=self.path))
        self._storages: dict[str, zipfile.ZipInfo] = {}
        self._offsets: dict[str, int | None] = {}
        loaded: list[Storage] = []

        def load_storage(key: str, storage_type: StorageType, numel: int) -> Storage:
            loaded.append(self._load_storage(key, storage_type, numel))
            return loaded[-1]

        obj = unpickle(
            self._read_record("data.pkl"),
            path=self.path,
            storage_loader=load_storage,
            extra_globals=self._extra_globals,
        )
        self._byteorder = self._check_records()
        self._tensors: dict[str, StoredTensor] = {}

        def register(key: str, t: StoredTensor) -> None:
            self._check_tensor(key, t)
            self._tensors[key] = t

        if self._whole is not None:
            self.obj = self._whole(obj, register)
        else:
            for key, t in select_state_dict(obj, entry, self.path).items():
                register(key, t)
        for storage in loaded:
            self._check_record_size(storage)
        self._verified: set[str] = set()

    def _check_records(self) -> str:
        """Read the records torch.load reads, with its checks; returns the byte order."""
        if self._record(".data/serialization_id") is not None:
            self._read_record(".data/serialization_id").decode("utf-8")  # torch.load decodes it
        name = ".data/version" if self._record(".data/version") is not None else "version"
        if self._record(name) is None:
            raise CheckpointError(ZIP_NO_VERSION.format(path=self.path, prefix=self._prefix))
        raw = self._read_record(name)
        version = parse_version(raw)
        if version is None or not VERSIONS[0] <= version <= VERSIONS[1]:
            raise CheckpointError(
                ZIP_BAD_VERSION.format(
                    path=self.path, entry=name, found=raw[:40], low=VERSIONS[0], high=VERSIONS[1]
                )
            )
        if self._record(".format_version") is not None:
            self._read_record(".format_version")
        order = "little"
        if self._record("byteorder") is not None:
            raw = self._read_record("byteorder")
            if raw not in (b"little", b"big"):
                raise CheckpointError(
                    ZIP_CORRUPT_ENTRY.format(
                        path=self.path,
                        entry="byteorder",
                        problem=f"unknown byte order {short_repr(raw[:40])}",
                    )
                )
            order = raw.decode()
        if self._record(".storage_alignment") is not None:
            int(self._read_record(".storage_alignment"))  # what torch.load does with it
        return order

    def _load_storage(self, key: str, storage_type: StorageType, numel: int) -> Storage:
        info = self._record(f"data/{key}")
        if info is None:
            name = f"{self._prefix}/data/{key}"
            raise CheckpointError(ZIP_MISSING_STORAGE.format(path=self.path, key=key, entry=name))
        assert storage_type.dtype is not None  # the unpickler refuses TypedStorage
        self._storages[key] = info
        if info.compress_size:
            self._storage_offset(key)  # what torch checks before reading a record (kept)
        return Storage(key, storage_type, numel * storage_type.dtype.itemsize)

    def _check_record_size(self, storage: Storage) -> None:
        """torch.load refuses a storage whose record is not exactly its persistent id's numel
        times the element size (so neither shorter nor longer, however the tensors use it)."""
        info = self._storages[storage.key]
        if info.file_size != storage.nbytes:
            assert storage.type.dtype is not None
            itemsize = storage.type.dtype.itemsize
            raise CheckpointError(
                ZIP_RECORD_SIZE.format(
                    path=self.path,
                    entry=info.filename,
                    found=info.file_size,
                    expected=storage.nbytes,
                    numel=storage.nbytes // itemsize,
                    itemsize=itemsize,
                    storage=storage.type.name,
                )
            )

    def _check_tensor(self, key: str, t: StoredTensor) -> None:
        """Refuse tensors whose elements would fall outside their storage (crafted files)."""
        info = self._storages[t.storage.key]
        if t.dtype is None:
            raise CheckpointError(
                ZIP_UNSUPPORTED_DTYPE.format(path=self.path, key=key, dtype=t.dtype_name)
            )
        size = min(info.file_size, t.storage.nbytes)
        problem = strided_problem(t.shape, t.stride, t.offset, t.dtype.itemsize, size)
        if problem is not None:
            raise CheckpointError(
                ZIP_BAD_TENSOR.format(path=self.path, entry=info.filename, problem=problem)
            )

    def _storage_offset(self, key: str) -> int | None:
        """Where storage `key`'s bytes start in the file; None for a compressed entry."""
        if key not in self._offsets:
            info = self._storages[key]
            start = self._archive.data_start(info)
            self._offsets[key] = start if info.compress_type == zipfile.ZIP_STORED else None
        return self._offsets[key]

    def _verify(self, key: str, crc: int) -> None:
        """Check the CRC-32 of storage `key`'s bytes against the archive's (once per storage)."""
        info = self._storages[key]
        if crc != info.CRC:
            raise CheckpointError(
                ZIP_CORRUPT_ENTRY.format(
                    path=self.path, entry=info.filename, problem="CRC-32 mismatch"
                )
            )
        self._verified.add(key)

    def _storage_bytes(self, key: str, *, verify: bool) -> np.ndarray:
        info = self._storages[key]
        offset = self._storage_offset(key)
        if offset is None:  # compressed entry: zipfile decompresses and checks the CRC
            return np.frombuffer(self._archive.read(info), dtype=np.uint8)
        raw = self._map.bytes_at(offset, info.file_size)
        if verify and key not in self._verified:
            self._verify(key, zlib.crc32(raw.data))
        return raw

    def _view(self, t: StoredTensor, *, verify: bool) -> np.ndarray:
        assert t.dtype is not None  # checked in _check_tensor
        if t.numel == 0:
            return np.empty(t.shape, dtype=t.dtype)
        raw = self._storage_bytes(t.storage.key, verify=verify)
        view_dtype = file_view_dtype(t.dtype, self._byteorder)
        itemsize = view_dtype.itemsize
        # as_strided goes through __array_interface__, which loses ml_dtypes types: stride
        # opaque same-size items, then view them as the real dtype.
        opaque = np.dtype((np.void, itemsize))
        base = raw[: raw.size - raw.size % itemsize].view(opaque)[t.offset :]
        strides = byte_strides(t.shape, t.stride, itemsize)
        return as_strided(base, shape=t.shape, strides=strides, writeable=False).view(view_dtype)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def _get(self, key: str) -> StoredTensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(missing_key_message(key, self.path, self._tensors)) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._get(key).shape

    def dtype(self, key: str) -> np.dtype:
        dtype = self._get(key).dtype
        assert dtype is not None
        return dtype

    def extent(self, key: str) -> Extent | None:
        """Where a C-contiguous tensor's bytes lie in the file; None for a strided tensor or a
        compressed storage (those are read through the mapping)."""
        t = self._get(key)
        assert t.dtype is not None
        if t.numel and tuple(t.stride) != _contiguous_strides(t.shape, t.stride):
            return None
        offset = self._storage_offset(t.storage.key)
        if offset is None:
            return None
        start = offset + t.offset * t.dtype.itemsize if t.numel else offset
        return Extent(self._map, start, t.shape, t.dtype, self._byteorder)

    def read(self, key: str) -> np.ndarray:
        """The whole tensor. Checks the storage's CRC-32 when the tensor spans all of it."""
        t = self._get(key)
        assert t.dtype is not None
        covers = t.numel * t.dtype.itemsize == t.storage.nbytes
        extent = self.extent(key) if t.numel else None
        if extent is None:
            return copy_out(self._view(t, verify=covers), t.dtype)
        check = None
        if covers and t.storage.key not in self._verified:
            check = functools.partial(self._verify, t.storage.key)
        return read_whole(extent, check=check)

    def read_slice(self, key: str, index: Any) -> np.ndarray:
        t = self._get(key)
        assert t.dtype is not None
        return copy_out(self._view(t, verify=False), t.dtype, normalize_index(index))

    def view(self, key: str) -> np.ndarray:
        t = self._get(key)
        assert t.dtype is not None
        return native_view(self._view(t, verify=False), t.dtype)

    def release(self) -> None:
        self._map.release()

    def close(self) -> None:
        self._map.close()
        self._archive.close()
