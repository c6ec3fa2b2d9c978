"""`shard_batch`: a batch split over the data-parallel axis of a mesh, PyTorch's
`DistributedSampler` plus `.to(device)` in one call.

Every array of the batch is split along its leading (batch) axis over the `axis` mesh axes
and replicated over the others; scalars are replicated. Two ways to feed it:

- every process passes the same global batch and each keeps only its devices' slices
  (`jax.make_array_from_callback`: nothing else is copied);
- `local=True`: each process passes its own part, `global batch / process_count` rows, as a
  per-rank data loader yields it (`jax.make_array_from_process_local_data`); process i's
  part becomes rows `[i * n, (i + 1) * n)` of the global batch when the mesh lists the
  processes' devices in order (as `jax.make_mesh` does).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._nested import key_path
from ._sharding import Axis, axis_size

_NOT_DIVISIBLE = (
    "batch leaf '{path}' has shape {shape}, but its leading axis is split over mesh axis "
    "{axis} of {n} devices{local}: make the batch size a multiple of {n} (as "
    "DistributedSampler(drop_last=True) does), or pad the batch"
)


def shard_batch(batch: Any, mesh: Mesh, axis: Axis = "data", *, local: bool = False) -> Any:
    """`batch` (any pytree of arrays) as global `jax.Array`s split over `axis` of `mesh`.

    Args:
        batch: the global batch (every process the same), or with `local=True` this
            process's part of it.
        mesh: the device mesh.
        axis: the mesh axis (or axes) the batch axis is split over.
        local: whether `batch` is this process's part rather than the global batch.

    Returns:
        The batch as `jax.Array`s with `NamedSharding(mesh, PartitionSpec(axis))` (scalars
        replicated); arrays already placed so are kept.

    Example:
        >>> import jax, numpy as np
        >>> from flax_registry import train
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> x = train.shard_batch({"image": np.zeros((4, 3))}, mesh)["image"]
        >>> x.sharding.spec
        P('data',)
    """
    size = axis_size(mesh, axis)
    processes = jax.process_count() if local else 1
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):  # every leaf before any copy
        shape = tuple(np.shape(leaf))
        if shape and (shape[0] * processes) % size:
            raise ValueError(
                _NOT_DIVISIBLE.format(
                    path="/".join(key_path(path)) or "batch",
                    shape=shape,
                    axis=axis,
                    n=size,
                    local=f" (this process's part of {processes})" if local else "",
                )
            )

    def put(leaf: Any) -> jax.Array:
        shape = tuple(np.shape(leaf))
        sharding = NamedSharding(mesh, PartitionSpec(axis) if shape else PartitionSpec())
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding and not local:
            return leaf
        host = np.asarray(leaf)
        if local and shape:
            return jax.make_array_from_process_local_data(sharding, host)
        return jax.make_array_from_callback(shape, sharding, lambda index: host[index])

    return jax.tree.map(put, batch)
