"""Reading tensors at the speed of memory: straight from the file into memory the array owns.

A plain read of a memory-mapped tensor copies twice in effect: the mapping's pages fault in
(the process's page tables fill, its RSS grows by the file) and numpy copies them out. Here a
tensor's bytes go from the OS page cache (or the disk) into the destination buffer with one
``preadv`` (:meth:`._mapped.MappedFile.read_into`); nothing of the file is mapped, so nothing
has to be released, and the destination can be the final array itself (`owned_empty`: 64-byte
aligned, which `jax.device_put` on CPU adopts without a copy).

Reads go by rows (ranges of the first axis), so one large tensor can be read by several
threads at once and a layout change (a transpose) can work on a cache-sized chunk while the
next one is read. `fix_native` then makes the bytes what every other read returns: bools
canonical (a byte other than 0 or 1 is True, stored as 1, as torch's ``copy_`` does) and the
machine's byte order.
"""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Callable

import numpy as np

from ._mapped import Extent

ALIGN = 64
"""XLA's CPU client adopts host buffers aligned to 64 bytes instead of copying them."""


def owned_empty(shape: tuple[int, ...], dtype: np.dtype, *, huge_pages: bool = False) -> np.ndarray:
    """An uninitialised, C-contiguous, 64-byte-aligned array that owns its memory (NumPy's
    allocator, which advises buffers of `HUGE_MIN` bytes or more onto transparent huge pages
    on Linux).

    With `huge_pages`, such a buffer starts on a huge-page boundary, for an array that is
    kept (a loaded variable): the allocator's start is only page-aligned, and the kernel
    backs a huge page only where a whole aligned 2 MiB range lies in the buffer, so a 16 MiB
    tensor took about 500 small page faults besides its huge pages (a BERT-large load:
    100,000 faults, against 2,700 aligned). The bytes skipped before the boundary are never
    touched: they cost address space (up to 2 MiB per array), not memory."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    align = HUGE_PAGE if huge_pages and nbytes >= HUGE_MIN else ALIGN
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


HUGE_PAGE = 2 << 20
"""The size of a transparent huge page on x86-64 and (4 KiB-page) arm64 Linux."""

HUGE_MIN = 4 << 20
"""NumPy advises allocations of this many bytes or more onto huge pages (`MADV_HUGEPAGE`)."""


def _bytes_of(out: np.ndarray) -> memoryview:
    """The writable bytes of a C-contiguous array (any dtype, ml_dtypes included)."""
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("reads go into a writable, C-contiguous array")
    return out.reshape(-1).view(np.uint8).data


def fix_native(out: np.ndarray, byteorder: str) -> None:
    """In place: the raw file bytes in `out` as the reader's arrays hold them (canonical bools,
    the machine's byte order)."""
    if out.dtype == np.bool_:
        raw = out.view(np.uint8)
        np.not_equal(raw, 0, out=out)
        return
    itemsize = out.dtype.itemsize
    if byteorder == sys.byteorder or itemsize == 1 or out.size == 0:
        return
    unit = itemsize // 2 if out.dtype.kind == "c" else itemsize  # complex: each part
    out.reshape(-1).view(np.dtype(f"u{unit}")).byteswap(inplace=True)


def read_rows(extent: Extent, start: int, stop: int, out: np.ndarray, *, raw: bool = False) -> None:
    """Rows ``[start, stop)`` of the tensor's first axis (the whole tensor for a scalar) into
    `out`, a C-contiguous array of its dtype and of that many rows, ready to use (with `raw`,
    the file's bytes as they are: `fix_native` them after checking a checksum)."""
    rows = stop - start
    expected = (rows, *extent.shape[1:]) if extent.shape else ()
    if out.dtype != extent.dtype or tuple(out.shape) != expected:
        raise ValueError(
            f"read_rows: rows {start}:{stop} of a {extent.shape} {extent.dtype} tensor need an "
            f"array of shape {expected}, got {out.shape} {out.dtype}"
        )
    if out.size == 0:
        return
    extent.file.read_into(extent.offset + start * extent.row_bytes, _bytes_of(out))
    if not raw:
        fix_native(out, extent.byteorder)


PAD_MIN = 512
"""Rows (groups of rows) of this many bytes or more, at a multiple of 128, get padded."""


class RowChunks:
    """One thread's reusable buffer for chunks of a tensor's rows, on a padded pitch.

    A transpose of a chunk reads one element of each of its rows per output row. Rows whose
    byte length is a multiple of 4 KiB (1,024 float32) all fall into the same set of the L1
    cache, which holds 8 to 12 lines of a set: a chunk of 256 such rows misses on every
    read. Here a row of a multiple of 128 bytes (`PAD_MIN` or more) is followed by 64 bytes of
    padding, so the rows' lines spread over every set; one ``preadv`` still reads the whole
    chunk (one buffer per row). A BERT-large kernel's chunk is laid out 1.6-1.9x faster.
    Memory: the largest chunk read, kept for the thread's next chunk (a fresh allocation per
    chunk would fault in new pages for every megabyte read)."""

    def __init__(self) -> None:
        self._raw = np.empty(0, np.uint8)
        self._rows: dict[tuple[int, int], list[memoryview]] = {}

    def read(self, extent: Extent, start: int, stop: int, group: int = 1) -> np.ndarray:
        """Rows ``[start, stop)`` of the tensor's first axis (a multiple of `group` of them),
        ready to use, as a 2-D array: one row per `group` rows of the tensor, each holding
        their elements in order, rows `pitch` bytes apart. Valid until the next read."""
        unit = group * extent.row_bytes
        count = (stop - start) // group
        if count * group != stop - start:
            raise ValueError(f"RowChunks.read: {stop - start} rows are not groups of {group}")
        pitch = unit + ALIGN if unit >= PAD_MIN and unit % 128 == 0 else unit
        if self._raw.nbytes < count * pitch:  # in whole huge pages: a few faults, not 2,000
            size = -(-count * pitch // HUGE_PAGE) * HUGE_PAGE
            self._raw = owned_empty((size,), np.dtype(np.uint8), huge_pages=True)
            self._rows.clear()
        offset = extent.offset + start * extent.row_bytes
        if pitch == unit:
            target = [self._raw.data[: count * unit]]
        else:
            target = self._row_views(pitch, unit, count)
        extent.file.read_scattered(offset, target, count * unit)
        block = self._raw[: count * pitch].view(extent.dtype)
        fix_native(block, extent.byteorder)  # the padding's bytes too: harmless
        itemsize = extent.dtype.itemsize
        return block.reshape(count, pitch // itemsize)[:, : unit // itemsize]

    def _row_views(self, pitch: int, unit: int, count: int) -> list[memoryview]:
        rows = self._rows.setdefault((pitch, unit), [])
        if len(rows) < count:
            whole = self._raw.data
            rows += [whole[i * pitch : i * pitch + unit] for i in range(len(rows), count)]
        return rows[:count]


def read_whole(
    extent: Extent, out: np.ndarray | None = None, *, check: Callable[[int], None] | None = None
) -> np.ndarray:
    """The whole tensor, read into `out` (default: a fresh `owned_empty` array). `check`, when
    given, receives the CRC-32 of the file's bytes before they are made native."""
    if out is None:
        out = owned_empty(extent.shape, extent.dtype)
    read_rows(extent, 0, rows_of(extent), out, raw=True)
    if check is not None:
        check(zlib.crc32(_bytes_of(out)) if out.size else 0)
    fix_native(out, extent.byteorder)
    return out


def rows_of(extent: Extent) -> int:
    """The length of the first axis (1 for a scalar)."""
    return extent.shape[0] if extent.shape else 1
