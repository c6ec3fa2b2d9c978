"""Gradient accumulation: one optimizer step from several micro-batches, PyTorch's
`loss.backward()` called once per micro-batch before `optimizer.step()`.

The batch is split along its leading axis into `micro_batches` equal parts; the forward and
backward passes run on each in turn (`jax.lax.scan`: one compiled body, the memory of one
micro-batch), each forward pass starting from the buffers the previous one left (BatchNorm
updates its running statistics and `num_batches_tracked` once per micro-batch, as in PyTorch),
and the step's gradient is the mean of the micro-batch gradients: PyTorch's
`(loss / micro_batches).backward()` summed, and, without BatchNorm, the gradient of the whole
batch. The reported loss and metrics are means over the micro-batches.

On a mesh with `replicas` data-parallel replicas, micro-batch k is made of the k-th slice of
every replica's part of the batch: what each rank of a DDP run accumulates over its own data
(`no_sync()`), with no data moving between devices. On one device it is the k-th contiguous
chunk, PyTorch's single-process loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._nested import key_path

GradFn = Callable[[Any, Any, Any, Any], tuple[tuple[Any, tuple[Any, Any, Any]], Any]]

_NOT_DIVISIBLE = (
    "gradient accumulation splits the batch axis into {micro} micro-batches{per_replica}, "
    "but batch leaf '{path}' has shape {shape}: make its leading dimension a multiple of "
    "{needed} (micro_batches x replicas), or change micro_batches"
)


def split_micro_batches(batch: Any, micro_batches: int, replicas: int = 1) -> Any:
    """Every array leaf `(N, ...)` of `batch` as `(micro_batches, N // micro_batches, ...)`;
    slice k is the k-th slice of each of the `replicas` consecutive parts of the batch."""
    k, r = micro_batches, replicas

    def split(path: Any, x: Any) -> Any:
        shape = tuple(np.shape(x))
        if not shape or shape[0] % (k * r):
            raise ValueError(
                _NOT_DIVISIBLE.format(
                    micro=k,
                    per_replica=f" within each of {r} replicas" if r > 1 else "",
                    path="/".join(key_path(path)) or "batch",
                    shape=shape,
                    needed=k * r,
                )
            )
        x = jnp.reshape(x, (r, k, shape[0] // (k * r), *shape[1:]))
        return jnp.reshape(jnp.swapaxes(x, 0, 1), (k, shape[0] // k, *shape[1:]))

    return jax.tree_util.tree_map_with_path(split, batch)


def accumulate(
    grad_fn: GradFn,
    params: Any,
    buffers: Any,
    batch: Any,
    key: jax.Array,
    micro_batches: int,
    replicas: int = 1,
) -> tuple[Any, jax.Array, dict[str, Any], Any]:
    """`(grads, loss, metrics, buffers)` of one step over `micro_batches` micro-batches.

    `grad_fn(params, buffers, batch, key)` is `jax.value_and_grad(..., has_aux=True)` of a
    function returning `(objective, (loss, metrics, new_buffers))`; micro-batch k gets the
    key `fold_in(key, k)`. With one micro-batch this is `grad_fn` itself, with `key`.
    """
    if micro_batches == 1:
        (_, (loss, metrics, buffers)), grads = grad_fn(params, buffers, batch, key)
        return grads, loss, metrics, buffers
    micro = split_micro_batches(batch, micro_batches, replicas)

    def body(carry: Any, xs: Any) -> tuple[Any, Any]:
        total, buffers = carry
        part, index = xs
        (_, (loss, metrics, buffers)), grads = grad_fn(
            params, buffers, part, jax.random.fold_in(key, index)
        )
        return (jax.tree.map(jnp.add, total, grads), buffers), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    indices = jnp.arange(micro_batches)
    (total, buffers), (losses, metrics) = jax.lax.scan(body, (zeros, buffers), (micro, indices))
    grads = jax.tree.map(lambda g: g / micro_batches, total)
    mean = lambda x: jnp.mean(x, axis=0)  # noqa: E731
    return grads, mean(losses), jax.tree.map(mean, metrics), buffers
