"""Reading the part of a torch tensor that one block of a flax variable needs, and placing it.

A flax variable is a layout change of (a part of) a torch tensor: reshape, transpose, flip.
`read_block` maps a block of the flax variable (a tuple of slices, as
`jax.make_array_from_callback` asks for one device's shard) back through the layout to the
torch ranges it comes from, reads only those (`read_slice` on the lazy checkpoint), and lays
the result out as flax wants it. A host therefore never materialises more than the shards of
its own devices: with a `NamedSharding` over a mesh, each device's block is read separately.

A variable that several torch keys fill (a `Stacked` rule's slices, a scanned module's layers)
is a `Task` of several `Piece`s, each the slice of the variable at fixed indices of its
stacked axes: a block reads only the pieces whose indices it contains (a device holding
layers 8-11 of a scanned model reads `layers.8` ... `layers.11`, nothing else), and the
checkpoint's pages are released after each piece, so one layer at a time is in flight.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

from .._shardings import ShardingSpec, sharding_for
from ..io import owned_empty
from ._layout import copy_tiled
from ._placement import place_from_file
from ._plan import Part
from ._source import Source

Range = tuple[int, int]


def _ranges(index: tuple[Any, ...], shape: tuple[int, ...]) -> list[Range]:
    out = []
    for i, n in enumerate(shape):
        s = index[i] if i < len(index) else slice(None)
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided block {index} is not supported (step {step})")
        out.append((start, max(start, stop)))
    return out


def read_block(
    source: Source,
    key: str,
    part: Part,
    offset: tuple[int, int] | None,
    index: tuple[Any, ...],
    dtype: np.dtype,
) -> np.ndarray:
    """Block `index` of flax variable `part` (of its slice `part.shape`, for a selected part),
    read from torch tensor `key` (whose part starts at `offset = (torch axis, start)` when
    several flax variables share the tensor), in `dtype`."""
    shape = tuple(b - a for a, b in _ranges(index, part.shape))
    out = owned_empty(tuple(shape), dtype)
    _read_into(out, source, key, part, offset, index)
    return out


def _read_into(
    out: np.ndarray,
    source: Source,
    key: str,
    part: Part,
    offset: tuple[int, int] | None,
    index: tuple[Any, ...],
) -> None:
    """`read_block` into `out` (a C-contiguous array or a view of one)."""
    layout, shape = part.layout, part.shape
    flax_rng = _ranges(index, shape)
    for axis in layout.flip:  # a reversed axis reads the mirrored range, then flips it
        start, stop = flax_rng[axis]
        flax_rng[axis] = (shape[axis] - stop, shape[axis] - start)
    split_shape = layout.split_shape(shape)
    split_rng = list(flax_rng)
    if layout.perm is not None:
        for k, axis in enumerate(layout.perm):
            split_rng[axis] = flax_rng[k]
    torch_rng: list[Range] = []
    block_shape: list[int] = []
    inner_index: list[slice] = []
    for group in layout.groups(len(split_shape)):
        inner = math.prod(split_shape[g] for g in group[1:])
        start, stop = split_rng[group[0]]
        torch_rng.append((start * inner, stop * inner))  # whole rows of the outer split axis
        block_shape.append(stop - start)
        inner_index.append(slice(None))
        for g in group[1:]:
            block_shape.append(split_shape[g])
            inner_index.append(slice(*split_rng[g]))
    if offset is not None:
        axis, start = offset
        a, b = torch_rng[axis]
        torch_rng[axis] = (a + start, b + start)
    block = source.read_slice(key, tuple(slice(a, b) for a, b in torch_rng))
    x = block.reshape(block_shape)[tuple(inner_index)]
    if layout.perm is not None:
        x = np.transpose(x, layout.perm)
    if layout.flip:
        x = np.flip(x, layout.flip)
    copy_tiled(out, x)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One torch tensor's share of a flax variable: torch key `key` (its part at `offset`
    when several variables share it) gives `part` (the whole variable, or one slice)."""

    key: str
    part: Part
    offset: tuple[int, int] | None


@dataclasses.dataclass(frozen=True)
class Task:
    """One flax variable to place, as `dtype`, from its pieces (together they cover it)."""

    pieces: tuple[Piece, ...]
    dtype: np.dtype
    sharding: Sharding | None

    @property
    def part(self) -> Part:
        """The first piece's part (collection, path and target leaf of the variable)."""
        return self.pieces[0].part

    @property
    def key(self) -> str:
        """The torch key the variable is named by: its first piece's."""
        return self.pieces[0].key

    @property
    def shape(self) -> tuple[int, ...]:
        return self.part.variable_shape


def read_variable_block(source: Source, task: Task, index: tuple[Any, ...]) -> np.ndarray:
    """Block `index` of the task's whole variable: each piece whose fixed indices lie in the
    block is read (only its range) into its place; the others are not touched."""
    rng = _ranges(index, task.shape)
    out = owned_empty(tuple(b - a for a, b in rng), task.dtype)
    stacked = len(task.pieces) > 1
    for piece in task.pieces:
        fixed = piece.part.fixed()
        if any(not rng[axis][0] <= i < rng[axis][1] for axis, i in fixed.items()):
            continue
        free = [axis for axis in range(len(rng)) if axis not in fixed]
        sub = tuple(slice(*rng[axis]) for axis in free)
        dest = tuple(
            fixed[axis] - rng[axis][0] if axis in fixed else slice(None) for axis in range(len(rng))
        )
        _read_into(out[(*dest, ...)], source, piece.key, piece.part, piece.offset, sub)
        if stacked and fixed:
            source.release()  # one layer's pages in flight, not the whole stack's
    return out


def _whole(source: Source, task: Task) -> np.ndarray:
    full = tuple(slice(0, n) for n in task.shape)
    return read_variable_block(source, task, full)


def _sharded(source: Source, task: Task) -> jax.Array:
    def callback(index: Any) -> np.ndarray:
        return read_variable_block(source, task, tuple(index))

    assert task.sharding is not None
    return jax.make_array_from_callback(task.shape, task.sharding, callback)


def place_all(
    source: Source,
    tasks: Sequence[Task],
    done: Callable[[Task, jax.Array], None],
    workers: int | None = None,
) -> None:
    """Place every task's variable, in order, calling `done(task, array)` for each.

    Without a sharding, a variable is read and laid out whole (in a worker thread, up to
    `workers` tensors ahead: numpy copies release the GIL) and put on the default device,
    which on CPU adopts the aligned buffer without copying. With a sharding, each device's
    block is read on its own (`jax.make_array_from_callback`). Memory in flight: `workers`
    tensors besides the output.
    """
    if place_from_file(source, tasks, done, workers, _whole, _sharded):
        return  # a checkpoint file: read straight into the arrays (see `_placement`)
    workers = workers or min(4, os.cpu_count() or 1)
    queue: collections.deque[tuple[Task, Future[np.ndarray] | None]] = collections.deque()
    pending = iter(tasks)
    with ThreadPoolExecutor(workers, thread_name_prefix="from_torch") as pool:

        def submit() -> None:
            task = next(pending, None)
            if task is not None:
                future = pool.submit(_whole, source, task) if task.sharding is None else None
                queue.append((task, future))

        for _ in range(workers):
            submit()
        while queue:
            task, future = queue.popleft()
            if future is not None:
                done(task, jax.device_put(future.result()))
            else:
                done(task, _sharded(source, task))
            submit()


def resolve_sharding(
    shardings: ShardingSpec,
    mesh: jax.sharding.Mesh | None,
    key: str,
    part: Part,
) -> Sharding | None:
    """The sharding of one target variable (torch key `key`; a variable several keys fill is
    named by its first, `layers.0.mlp.weight`, which globs such as `layers.*.mlp.*` match):
    from `shardings` (see `flax_registry._shardings`), else the target leaf's own (a
    `jax.ShapeDtypeStruct(..., sharding=...)` or a concrete array passed as `variables`), else
    None (the default device)."""
    leaf = jax.ShapeDtypeStruct(part.variable_shape, part.leaf.dtype)
    chosen = sharding_for(shardings, key, (part.collection, *part.path), leaf, mesh)
    if chosen is not None or shardings is not None:
        return chosen
    own = getattr(part.leaf, "sharding", None)
    return own if isinstance(own, Sharding) else None
