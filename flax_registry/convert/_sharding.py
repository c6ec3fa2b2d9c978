"""Reading the part of a torch tensor that one block of a flax variable needs, and placing it.

A flax variable is a layout change of (a part of) a torch tensor: reshape, transpose, flip.
`read_block` maps a block of the flax variable (a tuple of slices, as
`jax.make_array_from_callback` asks for one device's shard) back through the layout to the
torch ranges it comes from, reads only those (`read_slice` on the lazy checkpoint), and lays
the result out as flax wants it. A host therefore never materialises more than the shards of
its own devices: with a `NamedSharding` over a mesh, each device's block is read separately.
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
from ._layout import aligned_empty, copy_tiled
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
    """Block `index` of flax variable `part`, read from torch tensor `key` (whose part starts at
    `offset = (torch axis, start)` when several flax variables share the tensor), in `dtype`."""
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
    out = aligned_empty(x.shape, dtype)
    copy_tiled(out, x)
    return out


@dataclasses.dataclass(frozen=True)
class Task:
    """One flax variable to place: from torch key `key` (its part at `offset`), as `dtype`."""

    key: str
    part: Part
    offset: tuple[int, int] | None
    dtype: np.dtype
    sharding: Sharding | None


def _whole(source: Source, task: Task) -> np.ndarray:
    full = tuple(slice(0, n) for n in task.part.shape)
    return read_block(source, task.key, task.part, task.offset, full, task.dtype)


def _sharded(source: Source, task: Task) -> jax.Array:
    def callback(index: Any) -> np.ndarray:
        return read_block(source, task.key, task.part, task.offset, tuple(index), task.dtype)

    assert task.sharding is not None
    return jax.make_array_from_callback(task.part.shape, task.sharding, callback)


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
    """The sharding of one target variable (torch key `key`): from `shardings` (see
    `flax_registry._shardings`), else the target leaf's own (a `jax.ShapeDtypeStruct(...,
    sharding=...)` or a concrete array passed as `variables`), else None (the default device)."""
    leaf = jax.ShapeDtypeStruct(part.shape, part.leaf.dtype)
    chosen = sharding_for(shardings, key, (part.collection, *part.path), leaf, mesh)
    if chosen is not None or shardings is not None:
        return chosen
    own = getattr(part.leaf, "sharding", None)
    return own if isinstance(own, Sharding) else None
