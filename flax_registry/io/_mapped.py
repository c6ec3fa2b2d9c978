"""A read-only memory map of one file, and the protocol every checkpoint-file backend follows.

Backends hand out NumPy *views* over the mapped bytes; :func:`copy_out` turns a view (or an
indexed part of it) into a fresh, owned, C-contiguous array, so only the pages a read touches
are ever loaded, and closing the reader never invalidates an array it returned.

A :class:`MappedFile` is safe to share between threads: the first read opens and maps the file
under a lock (so concurrent first reads map it once, and no thread's descriptor is ever closed
under another), and later reads only take views of the one immutable mapping.

Whole tensors are read with :meth:`MappedFile.read_into` instead: ``preadv`` from one shared
descriptor straight into memory the caller owns, one copy from the page cache, with no page of
the mapping touched (so no page faults on it and nothing to release). The descriptor is
counted: ``close`` closes it only once no read is using it, so no thread ever reads a
descriptor number that another file has been given meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ._dtypes import to_native
from ._errors import CLOSED, CheckpointError

HAS_PREADV = hasattr(os, "preadv")


def _iov_max() -> int:
    """Buffers one ``preadv`` may fill (Linux: 1024; POSIX promises at least 16)."""
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (AttributeError, OSError, ValueError):  # no sysconf, or no such name
        return 16
    return min(1024, n) if n > 0 else 16


IOV_MAX = _iov_max()


def _groups(buffers: Sequence[memoryview]) -> list[Sequence[memoryview]]:
    """`buffers` in groups of at most `IOV_MAX`, one ``preadv`` each."""
    return [buffers[i : i + IOV_MAX] for i in range(0, len(buffers), IOV_MAX)]


def _after(buffers: list[memoryview], n: int) -> list[memoryview]:
    """What of `buffers` is left to fill once a read has filled their first `n` bytes."""
    i = 0
    while i < len(buffers) and n >= buffers[i].nbytes:
        n -= buffers[i].nbytes
        i += 1
    rest = buffers[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


class TensorFile(Protocol):
    """What :class:`~flax_registry.io.CheckpointReader` needs from one checkpoint file."""

    path: Path

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> np.dtype: ...

    def read(self, key: str) -> np.ndarray: ...

    def read_slice(self, key: str, index: Any) -> np.ndarray: ...

    def view(self, key: str) -> np.ndarray: ...

    def extent(self, key: str) -> Extent | None: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


class MappedFile:
    """A lazily opened, read-only ``mmap`` of ``path`` (nothing is mapped until the first read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        self._mmap: mmap.mmap | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._fd_users = 0

    def _mapping(self) -> mmap.mmap:
        """The mapping, created by the first caller (under the lock; later calls are lock-free)."""
        mapped = self._mmap
        if mapped is not None:
            return mapped
        with self._lock:
            if self._closed:
                raise CheckpointError(CLOSED.format(path=self.path))
            if self._mmap is None:
                with open(self.path, "rb") as f:  # mmap keeps its own duplicate of the descriptor
                    self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return self._mmap

    def bytes_at(self, offset: int, length: int) -> np.ndarray:
        """A read-only uint8 view of ``length`` bytes at ``offset`` (bounds checked by callers)."""
        if self._closed:
            raise CheckpointError(CLOSED.format(path=self.path))
        if length == 0:
            return np.empty(0, dtype=np.uint8)
        if offset < 0 or offset + length > self.size:
            raise CheckpointError(
                f"{self.path}: read of {length} bytes at {offset} is outside the file"
            )
        return np.frombuffer(self._mapping(), dtype=np.uint8, count=length, offset=offset)

    def _acquire_fd(self) -> int:
        with self._lock:
            if self._closed:
                raise CheckpointError(CLOSED.format(path=self.path))
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fd_users += 1
            return self._fd

    def _release_fd(self) -> None:
        with self._lock:
            self._fd_users -= 1
            if self._closed and self._fd_users == 0 and self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def read_into(self, offset: int, out: memoryview) -> None:
        """Copy the ``len(out)`` bytes at ``offset`` into ``out`` (a writable, contiguous byte
        buffer) straight from the file: ``preadv`` where the OS has it, else from the mapping."""
        target = out.cast("B")
        self.read_scattered(offset, [target], target.nbytes)

    def read_scattered(self, offset: int, buffers: Sequence[memoryview], length: int) -> None:
        """Copy the ``length`` bytes at ``offset`` into ``buffers`` (writable byte buffers of
        ``length`` bytes together), one after the other: one ``preadv`` for up to ``IOV_MAX``
        of them, so the bytes can land with gaps between them (padded rows) at no extra cost."""
        if self._closed:
            raise CheckpointError(CLOSED.format(path=self.path))
        if offset < 0 or offset + length > self.size:
            raise CheckpointError(
                f"{self.path}: read of {length} bytes at {offset} is outside the file"
            )
        if length == 0:
            return
        if not HAS_PREADV:
            for buffer in buffers:
                buffer[:] = self.bytes_at(offset, buffer.nbytes).data
                offset += buffer.nbytes
            return
        groups = [buffers] if len(buffers) <= IOV_MAX else _groups(buffers)
        fd = self._acquire_fd()
        try:
            done = 0
            for group in groups:
                left = length if len(groups) == 1 else sum(b.nbytes for b in group)
                while left:
                    n = os.preadv(fd, group, offset + done)
                    if n <= 0:
                        raise CheckpointError(
                            f"{self.path}: the file ended after {offset + done} bytes while "
                            f"reading {length} bytes at {offset} (it was truncated after it "
                            "was opened)"
                        )
                    done += n
                    left -= n
                    if left:  # a short read (a signal, a network file system): go on
                        group = _after(list(group), n)
        finally:
            self._release_fd()

    def release(self) -> None:
        """Drop the mapped pages from this process's resident memory (`MADV_DONTNEED`); they
        stay in the OS page cache, and a later read maps them back in."""
        mapped = self._mmap
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                mapped.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Unmap; arrays already returned by reads stay valid (they are copies)."""
        with self._lock:
            self._closed = True
            mapped, self._mmap = self._mmap, None
            if self._fd is not None and self._fd_users == 0:
                os.close(self._fd)
                self._fd = None
        if mapped is not None:
            # BufferError: a view is still referenced somewhere; GC unmaps it later.
            with contextlib.suppress(BufferError):
                mapped.close()


@dataclasses.dataclass(frozen=True)
class Extent:
    """Where the bytes of a C-contiguous tensor lie in its file: from ``offset``, ``shape`` of
    ``dtype`` (the dtype reads return), stored in the file's ``byteorder``."""

    file: MappedFile
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    byteorder: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes per index of the first axis (the whole tensor for a scalar)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def typed_view(raw: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """View contiguous bytes ``raw`` as an array of ``dtype`` and ``shape`` (no copy)."""
    if raw.size == 0:
        return np.empty(shape, dtype=dtype)
    return raw.view(dtype).reshape(shape)


def copy_out(view: np.ndarray, dtype: np.dtype, index: Any = None) -> np.ndarray:
    """A fresh C-contiguous array of native ``dtype`` from ``view`` (or ``view[index]``).

    Only the elements selected by ``index`` are copied, so a slice of a memory-mapped tensor
    loads just the pages it covers. A bool byte other than 0 or 1 is read as True and stored
    as 1 (as torch's ``copy_`` does), so no NumPy or XLA operation sees a non-canonical bool.
    """
    part = view if index is None else view[index]
    if dtype == np.bool_:
        canonical = np.empty(part.shape, dtype=np.bool_)
        np.not_equal(part.view(np.uint8), 0, out=canonical)
        return canonical
    out = np.array(part, copy=True, order="C")
    return to_native(out, dtype)


def native_view(view: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``view`` as native-order ``dtype`` without a copy where the bytes allow it (a copy only
    for a byte-swapped file), read-only."""
    out = to_native(view, dtype)
    out.flags.writeable = False
    return out


def normalize_index(index: Any) -> Any:
    """Accept ``x[1:3]`` style single indices as well as tuples (what ``__getitem__`` gets)."""
    return index if isinstance(index, tuple) else (index,)
