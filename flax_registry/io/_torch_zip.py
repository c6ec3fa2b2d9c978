"""Reading PyTorch zip checkpoints (``torch.save``'s default format) without importing torch.

``data.pkl`` goes through :mod:`._unpickler` (an allowlist; nothing is executed). Storages are
stored uncompressed in the archive, so each tensor is a strided NumPy view of the memory-mapped
file at the storage's data offset (found from the zip local header); reads copy only the
selected elements. Differs from ``torch.load(path, weights_only=True, mmap=True)``: no torch,
arrays instead of tensors, and a nested checkpoint must name the state dict with ``entry``.
A re-zipped (deflated) archive still loads, but each read then decompresses its whole storage.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._dtypes import file_view_dtype
from ._errors import (
    ZIP_BAD,
    ZIP_BAD_TENSOR,
    ZIP_CORRUPT_ENTRY,
    ZIP_MISSING_STORAGE,
    ZIP_NO_PICKLE,
    ZIP_TORCHSCRIPT,
    ZIP_UNSUPPORTED_DTYPE,
    CheckpointError,
    missing_key_message,
)
from ._mapped import MappedFile, copy_out, native_view, normalize_index
from ._state_dict import select_state_dict
from ._unpickler import Storage, StorageType, StoredTensor, unpickle

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_MAGIC = b"PK\x03\x04"


def _find_prefix(path: Path, names: list[str]) -> str:
    """The archive's root folder (``'<name>/'``) holding ``data.pkl``."""
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise CheckpointError(ZIP_NO_PICKLE.format(path=path, found=shown or "none"))
    prefix = pickles[0][: -len("data.pkl")]
    if prefix + "constants.pkl" in names or any(n.startswith(prefix + "code/") for n in names):
        raise CheckpointError(ZIP_TORCHSCRIPT.format(path=path))
    return prefix


class TorchZipFile:
    """One open ``torch.save`` zip archive (the :class:`TensorFile` backend for .pt/.pth/.bin)."""

    def __init__(self, path: Path, *, entry: str | None = None) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self._map = MappedFile(path)
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
            raise CheckpointError(ZIP_BAD.format(path=path, error=e)) from None
        try:
            self._init(entry)
        except BaseException:
            self._zip.close()
            raise

    def _init(self, entry: str | None) -> None:
        names = self._zip.namelist()
        self._prefix = _find_prefix(self.path, names)
        self._byteorder = "little"
        if self._prefix + "byteorder" in names:
            order = self._read_entry(self._prefix + "byteorder").decode("ascii", "replace")
            if order not in ("little", "big"):
                raise CheckpointError(
                    ZIP_CORRUPT_ENTRY.format(
                        path=self.path, entry="byteorder", problem=f"unknown byte order {order!r}"
                    )
                )
            self._byteorder = order
        self._storages: dict[str, zipfile.ZipInfo] = {}
        obj = unpickle(
            self._read_entry(self._prefix + "data.pkl"),
            path=self.path,
            storage_loader=self._load_storage,
        )
        tensors = select_state_dict(obj, entry, self.path)
        self._tensors: dict[str, StoredTensor] = {}
        for key, t in tensors.items():
            self._check_tensor(key, t)
            self._tensors[key] = t
        self._offsets: dict[str, int | None] = {}
        self._verified: set[str] = set()

    def _read_entry(self, name: str) -> bytes:
        """Read a whole archive entry; zipfile checks its CRC."""
        try:
            return self._zip.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise CheckpointError(
                ZIP_CORRUPT_ENTRY.format(path=self.path, entry=name, problem=e)
            ) from None

    def _load_storage(self, key: str, storage_type: StorageType) -> Storage:
        name = f"{self._prefix}data/{key}"
        try:
            self._storages[key] = self._zip.getinfo(name)
        except KeyError:
            raise CheckpointError(
                ZIP_MISSING_STORAGE.format(path=self.path, key=key, entry=name)
            ) from None
        return Storage(key, storage_type)

    def _check_tensor(self, key: str, t: StoredTensor) -> None:
        """Refuse tensors whose elements would fall outside their storage (crafted files)."""
        info = self._storages[t.storage.key]

        def bad(problem: str) -> CheckpointError:
            return CheckpointError(
                ZIP_BAD_TENSOR.format(path=self.path, entry=info.filename, problem=problem)
            )

        if t.dtype is None:
            raise CheckpointError(
                ZIP_UNSUPPORTED_DTYPE.format(path=self.path, key=key, dtype=t.dtype_name)
            )
        if t.numel == 0:
            return
        last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
        needed = (last + 1) * t.dtype.itemsize
        if needed > info.file_size:
            raise bad(
                f"shape {t.shape}, stride {t.stride} and offset {t.offset} reach byte {needed}, "
                f"but the storage holds {info.file_size} bytes"
            )

    def _data_offset(self, info: zipfile.ZipInfo) -> int | None:
        """Where an entry's bytes start in the file; None if it is compressed (then read it)."""
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            return None
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            head = f.read(_LOCAL_HEADER.size)
        if len(head) != _LOCAL_HEADER.size or head[:4] != _LOCAL_MAGIC:
            raise CheckpointError(
                ZIP_CORRUPT_ENTRY.format(
                    path=self.path, entry=info.filename, problem="bad local file header"
                )
            )
        fields = _LOCAL_HEADER.unpack(head)
        start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        if start + info.file_size > self._map.size:
            raise CheckpointError(
                ZIP_CORRUPT_ENTRY.format(
                    path=self.path,
                    entry=info.filename,
                    problem=f"its data ends at byte {start + info.file_size}, past the end of the "
                    f"file ({self._map.size} bytes): the file is truncated",
                )
            )
        return start

    def _storage_bytes(self, key: str, *, verify: bool) -> np.ndarray:
        info = self._storages[key]
        if key not in self._offsets:
            self._offsets[key] = self._data_offset(info)
        offset = self._offsets[key]
        if offset is None:  # compressed entry: zipfile decompresses and checks the CRC
            return np.frombuffer(self._read_entry(info.filename), dtype=np.uint8)
        raw = self._map.bytes_at(offset, info.file_size)
        if verify and key not in self._verified:
            if zlib.crc32(raw.data) != info.CRC:
                raise CheckpointError(
                    ZIP_CORRUPT_ENTRY.format(
                        path=self.path, entry=info.filename, problem="CRC-32 mismatch"
                    )
                )
            self._verified.add(key)
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
        strides = tuple(s * itemsize for s in t.stride)
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

    def read(self, key: str) -> np.ndarray:
        """The whole tensor. Checks the storage's CRC-32 when the tensor spans all of it."""
        t = self._get(key)
        assert t.dtype is not None
        covers = t.numel * t.dtype.itemsize == self._storages[t.storage.key].file_size
        return copy_out(self._view(t, verify=covers), t.dtype)

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
        self._zip.close()
