"""Placing a conversion's variables straight from the checkpoint file, in parallel.

For a checkpoint file (`flax_registry.io.CheckpointReader`), each flax variable is made in the
buffer that becomes its array: `io.owned_empty` (64-byte aligned, so `jax.device_put` on CPU
adopts it without a copy; a large one on a huge-page boundary, so that it faults in 2 MiB at
a time). Its torch tensor is read in ranges of rows (`preadv`: one copy from the page cache,
nothing of the file mapped):

- a variable stored as torch stores it (any reshape, same dtype) is read directly into the
  output with `io.read_rows`, in chunks of `DIRECT_CHUNK` bytes;
- a layout change (transpose, flip) or a cast goes through a chunk of at most `LAYOUT_ROWS`
  rows (`LAYOUT_CHUNK` bytes) read by `io.RowChunks` (rows on a padded pitch), laid out into
  its part of the output with one `np.copyto`, while other threads read the next chunks: the
  transposes are blocked (by the chunk's rows) and multi-threaded.

Chunks of every variable go to one bounded thread pool (reads and NumPy copies release the
GIL). On CPU every variable is read ahead (its buffer is its array: no extra memory), the
main thread waits once for all of them and makes every array with one `jax.device_put`, so
that it holds the GIL as little as it can while the readers need it. On an accelerator, the
variables are handed to `done` in order as their chunks finish, in batches of those ready,
while later ones are read: memory is then the output plus the variables read ahead and not
yet transferred, at most `AHEAD` bytes. Either way, one chunk per thread besides. Variables
the file path cannot serve (a sharding, a strided or compressed tensor, a part of a fused
tensor along another axis than the first) go through the caller's own functions in the same
order.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

import jax
import numpy as np

from ..io import CheckpointReader, Extent, RowChunks, owned_empty, read_rows

DIRECT_CHUNK = 16 << 20
"""Bytes a worker reads at once into an output stored in torch's layout."""

LAYOUT_CHUNK = 8 << 20
"""Bytes of torch rows a worker reads at once before laying them out (a transpose's tile)."""

LAYOUT_ROWS = 512
"""At most this many torch rows per chunk. A transposed chunk is copied with its rows as the
innermost axis of the output, so each output row reads one element of every chunk row: the
512 cache lines this touches (32 KiB) stay in the L1 cache, their rows padded by
`io.RowChunks` so that they do not all fall into one cache set, and the whole chunk is one
`np.copyto` that releases the GIL once. In the pipeline this is 1.3x faster than tiling the
chunk with `copy_tiled` in Python (`benchmarks/load_floor.py`), whose many short copies
contend for the GIL with the other threads."""

PUT_BATCH = 64
"""At most this many variables go to `jax.device_put` in one call (one call costs about 100
µs of the main thread's time, holding the GIL the readers need; a batch, about 30 µs each)."""

AHEAD = 512 << 20
"""On an accelerator, at most this many bytes of variables read ahead of the one handed to
`done` (on CPU, the variables are their read buffers: all are read ahead)."""


@dataclasses.dataclass
class _Pending:
    task: Any
    nbytes: int
    out: np.ndarray | None = None
    futures: list[Future[Any]] = dataclasses.field(default_factory=list)
    single: Future[Any] | None = None  # the caller's own path, in a worker


def _read(item: _Pending) -> bool:
    """Whether every chunk of the item is in its output (an error in one is raised too)."""
    if item.out is None or not all(f.done() for f in item.futures):
        return False
    for future in item.futures:
        future.result()
    return True


def _whole_released(whole: Callable[[Any, Any], np.ndarray], source: Any, task: Any) -> np.ndarray:
    """The caller's path for one variable (through the mapped file), its pages released
    after it: with every variable read ahead, they would otherwise stay resident till the end."""
    try:
        return whole(source, task)
    finally:
        source.release()


def _stays_on_host() -> bool:
    """Whether `jax.device_put` of a host array makes a CPU array (then a variable's array is
    the buffer it was read into, and reading every variable ahead costs no extra memory)."""
    device = getattr(jax.config, "jax_default_device", None)
    if device is None:
        return jax.default_backend() == "cpu"
    return (device if isinstance(device, str) else device.platform) == "cpu"


def _finish_on_host(
    items: Sequence[_Pending],
    done: Callable[[Any, jax.Array], None],
    sharded: Callable[[Any], jax.Array],
) -> None:
    """Wait for every read (the main thread wakes once, not once per chunk), then make all the
    arrays with one `jax.device_put` and hand them to `done` in order."""
    futures = [f for item in items for f in item.futures]
    futures += [item.single for item in items if item.single is not None]
    wait(futures, return_when=FIRST_EXCEPTION)
    for future in futures:
        future.result()  # the first error, if any
    read = [item for item in items if item.out is not None]
    arrays = iter(jax.device_put([item.out for item in read]))
    for item in items:
        if item.out is not None:
            array = next(arrays)
        elif item.single is not None:
            array = jax.device_put(item.single.result())
        else:
            array = sharded(item.task)
        done(item.task, array)


def _extent(reader: CheckpointReader, piece: Any) -> Extent | None:
    """The file extent of the piece's tensor when the row path can place it, else None."""
    if piece.offset is not None and piece.offset[0] != 0:
        return None  # a part of a fused tensor along another axis: not whole rows
    extent = reader.extent(piece.key)
    torch_shape = tuple(piece.part.torch_shape)
    if extent is None or len(extent.shape) != len(torch_shape) or not torch_shape:
        return None  # a scalar is read whole by the caller's path
    if extent.shape[1:] != torch_shape[1:]:
        return None
    return extent


def _extents(reader: CheckpointReader, task: Any) -> list[Extent] | None:
    """One extent per piece of the task (a stacked variable has several), or None when one
    of them cannot be placed by rows (the caller's path then reads the whole variable)."""
    if task.sharding is not None:
        return None
    extents = [_extent(reader, piece) for piece in task.pieces]
    return None if any(e is None for e in extents) else extents  # type: ignore[return-value]


def _jobs(extent: Extent, piece: Any, out: np.ndarray) -> list[Callable[[], None]]:
    """The chunks that fill `out` (the piece's part of the flax variable: the whole variable,
    or a view of its slice) from the torch tensor at `extent`."""
    layout = piece.part.layout
    split = layout.split_shape(tuple(piece.part.shape))
    groups = layout.groups(len(split))
    inner = math.prod(split[g] for g in groups[0][1:]) if groups and groups[0] else 1
    start = piece.offset[1] if piece.offset is not None else 0
    outer = split[0] if split else 1
    moves = layout.perm is not None or bool(layout.flip)
    torch_shape = tuple(piece.part.torch_shape)
    if not moves and out.dtype == extent.dtype and out.flags.c_contiguous:  # straight in
        flat = out.reshape(torch_shape)
        per = max(1, DIRECT_CHUNK // max(1, extent.row_bytes))
        rows = torch_shape[0]

        def direct(a: int, b: int) -> Callable[[], None]:
            return lambda: read_rows(extent, start + a, start + b, flat[a:b])

        return [direct(a, min(rows, a + per)) for a in range(0, rows, per)]
    k0 = layout.perm.index(0) if layout.perm is not None else 0
    row_bytes = max(1, inner * extent.row_bytes)
    per = max(1, min(LAYOUT_ROWS, LAYOUT_CHUNK // row_bytes))

    def laid_out(a: int, b: int) -> Callable[[], None]:
        def run() -> None:
            rows = _chunks().read(extent, start + a * inner, start + b * inner, inner)
            x = rows.reshape((b - a, *split[1:]))
            if layout.perm is not None:
                x = np.transpose(x, layout.perm)
            if layout.flip:
                x = np.flip(x, layout.flip)
            lo, hi = (outer - b, outer - a) if k0 in layout.flip else (a, b)
            np.copyto(out[(slice(None),) * k0 + (slice(lo, hi),)], x, casting="unsafe")

        return run

    return [laid_out(a, min(outer, a + per)) for a in range(0, outer, per)]


_THREAD = threading.local()


def _chunks() -> RowChunks:
    """This thread's chunk buffer."""
    chunks = getattr(_THREAD, "chunks", None)
    if chunks is None:
        chunks = _THREAD.chunks = RowChunks()
    return chunks


def place_from_file(
    source: Any,
    tasks: Sequence[Any],
    done: Callable[[Any, jax.Array], None],
    workers: int | None,
    whole: Callable[[Any, Any], np.ndarray],
    sharded: Callable[[Any, Any], jax.Array],
) -> bool:
    """Place `tasks` as `_sharding.place_all` does, reading from the file where it can;
    False (nothing done) when `source` is not a checkpoint file. `whole(source, task)` and
    `sharded(source, task)` are the caller's paths for the variables this one cannot place."""
    reader = getattr(source, "mapping", None)
    if not isinstance(reader, CheckpointReader):
        return False
    workers = workers or min(8, os.cpu_count() or 1)
    window: collections.deque[_Pending] = collections.deque()
    pending = iter(tasks)
    ahead = 0
    pool = ThreadPoolExecutor(workers, thread_name_prefix="from_torch")
    try:

        def submit() -> bool:
            nonlocal ahead
            task = next(pending, None)
            if task is None:
                return False
            nbytes = math.prod(task.shape) * np.dtype(task.dtype).itemsize
            item = _Pending(task, nbytes)
            extents = _extents(reader, task)
            if extents is not None:
                item.out = owned_empty(tuple(task.shape), np.dtype(task.dtype), huge_pages=True)
                for extent, piece in zip(extents, task.pieces):
                    view = piece.part.take(item.out)
                    item.futures += [pool.submit(job) for job in _jobs(extent, piece, view)]
            elif task.sharding is None:
                item.single = pool.submit(_whole_released, whole, source, task)
            window.append(item)
            ahead += nbytes
            return True

        host = _stays_on_host()
        while (host or len(window) < 2 or ahead < AHEAD) and submit():
            pass
        if host:  # every variable read ahead: its buffer is its array anyway
            _finish_on_host(window, done, lambda task: sharded(source, task))
            return True
        while window:
            item = window.popleft()
            ahead -= item.nbytes
            if item.out is None:
                if item.single is not None:
                    array = jax.device_put(item.single.result())
                else:
                    array = sharded(source, item.task)
                done(item.task, array)
            else:
                for future in item.futures:
                    future.result()
                batch = [item]  # and the variables behind it that are read already
                while window and len(batch) < PUT_BATCH and _read(window[0]):
                    batch.append(window.popleft())
                    ahead -= batch[-1].nbytes
                for ready, array in zip(batch, jax.device_put([b.out for b in batch])):
                    done(ready.task, array)
            while (len(window) < 2 or ahead < AHEAD) and submit():
                pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return True
