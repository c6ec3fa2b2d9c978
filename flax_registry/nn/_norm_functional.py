"""Pure normalization functions, the counterparts of `torch.nn.functional.{batch,instance,
layer,group}_norm`.

They never mutate anything: where PyTorch updates `running_mean` / `running_var` in place, these
return the new running statistics, and the layers in `batchnorm.py` / `instancenorm.py` write
them with `update_buffer`. Statistics are computed in at least float32 (as PyTorch's CPU and CUDA
kernels accumulate half-precision inputs in float32) with the two-pass formula
`mean((x - mean)**2)`; the output has the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .._messages import torch_size

Array = jax.Array

_BATCH_SIZE = "Expected more than 1 value per channel when training, got input size {size}"
_SPATIAL_SIZE = "Expected more than 1 spatial element when training, got input size {size}"
_REPLICA_SPLIT = (
    "per-replica batch statistics split the batch axis into {groups} equal parts (one per "
    "replica), but the input has shape {size}, whose batch size {n} is not a multiple of "
    "{groups}: make the global batch size a multiple of the number of replicas (as "
    "DistributedSampler gives every rank the same batch size), or use global statistics"
)


def verify_batch_size(shape: Sequence[int]) -> None:
    """PyTorch's `_verify_batch_size`: one value per channel has no variance to normalise by."""
    if shape[0] * math.prod(shape[2:]) == 1:
        raise ValueError(_BATCH_SIZE.format(size=torch_size(shape)))


def _stat_dtype(x: Array) -> Any:
    return jnp.promote_types(x.dtype, jnp.float32)


def _moments(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Mean and biased variance over `axes`, kept as broadcastable dimensions."""
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    return mean, var


def _channel(v: Array | None, ndim: int, dtype: Any) -> Array | None:
    """A per-channel vector `(C,)` shaped to broadcast against a channels-first `(N, C, *)`."""
    if v is None:
        return None
    return jnp.reshape(v.astype(dtype), (1, -1) + (1,) * (ndim - 2))


def _normalize(
    x: Array, mean: Array, var: Array, weight: Array | None, bias: Array | None, eps: float
) -> Array:
    """`(x - mean) / sqrt(var + eps) * weight + bias` (weight/bias already broadcastable)."""
    return _affine((x - mean) * jax.lax.rsqrt(var + eps), weight, bias)


def _affine(y: Array, weight: Array | None, bias: Array | None) -> Array:
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _unbiased(var: Array, n: int) -> Array:
    return var * (n / (n - 1))


def _blend(running: Array, batch: Array, momentum: Any) -> Array:
    """PyTorch's running-statistic update `(1 - momentum) * running + momentum * batch`."""
    return jax.lax.stop_gradient((1 - momentum) * running.astype(batch.dtype) + momentum * batch)


def batch_norm(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    *,
    training: bool,
    momentum: Any,
    eps: float,
    groups: int = 1,
) -> tuple[Array, Array | None, Array | None]:
    """`F.batch_norm` without the in-place update: returns `(y, new_running_mean, new_running_var)`.

    With `training`, the input is normalised by the batch mean and biased variance over every
    axis but the channel axis 1, and, when running statistics are given, the new ones are
    `(1 - momentum) * running + momentum * batch_stat` with the UNBIASED batch variance (as
    PyTorch); otherwise the running statistics normalise and come back unchanged. `momentum`
    may be a traced scalar (the cumulative average's `1 / num_batches_tracked`).

    `groups > 1` is PyTorch DDP's per-replica BatchNorm as one program: the batch axis is split
    into `groups` equal consecutive parts (the replicas' parts of a batch sharded over a mesh
    axis), each normalised by its own statistics, and the running statistics move towards
    those of the first part only: DDP's `broadcast_buffers=True` hands rank 0's buffers to
    every rank before each forward pass. `groups=1` is one process's `F.batch_norm`, which is
    also `SyncBatchNorm`'s math over the whole (global) batch.
    """
    dtype = _stat_dtype(x)
    xc = x.astype(dtype)
    w, b = _channel(weight, x.ndim, dtype), _channel(bias, x.ndim, dtype)
    if not training:
        assert running_mean is not None and running_var is not None
        mean, var = _channel(running_mean, x.ndim, dtype), _channel(running_var, x.ndim, dtype)
        assert mean is not None and var is not None
        return _normalize(xc, mean, var, w, b, eps).astype(x.dtype), running_mean, running_var
    if groups == 1:
        verify_batch_size(x.shape)
        mean, var = _moments(xc, (0, *range(2, x.ndim)))
        y = _normalize(xc, mean, var, w, b, eps).astype(x.dtype)
    else:
        mean, var, y = _per_group(xc, groups, w, b, eps)
        y = y.astype(x.dtype)
    if running_mean is None or running_var is None:
        return y, running_mean, running_var
    n = x.size // x.shape[1] // groups
    new_mean = _blend(running_mean, mean.reshape(-1), momentum)
    new_var = _blend(running_var, _unbiased(var, n).reshape(-1), momentum)
    return y, new_mean, new_var


def _per_group(
    x: Array, groups: int, weight: Array | None, bias: Array | None, eps: float
) -> tuple[Array, Array, Array]:
    """Each of `groups` consecutive parts of the batch normalised by its own statistics; the
    first part's mean and biased variance (as `(1, C, 1, ...)`) come back with the output.
    The reshape keeps a batch axis sharded over the replicas local: no data moves."""
    if x.shape[0] % groups:
        raise ValueError(
            _REPLICA_SPLIT.format(groups=groups, size=torch_size(x.shape), n=x.shape[0])
        )
    grouped = x.reshape((groups, x.shape[0] // groups, *x.shape[1:]))
    verify_batch_size(grouped.shape[1:])
    mean, var = _moments(grouped, (1, *range(3, grouped.ndim)))
    y = ((grouped - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    return mean[0], var[0], _affine(y, weight, bias)


def instance_norm(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    *,
    use_input_stats: bool,
    momentum: Any,
    eps: float,
) -> tuple[Array, Array | None, Array | None]:
    """`F.instance_norm` on a batched `(N, C, *)` input without the in-place update.

    With `use_input_stats`, each `(sample, channel)` plane is normalised by its own mean and
    biased variance; running statistics, when given, move towards the per-plane mean and
    UNBIASED variance averaged over the batch (PyTorch runs batch norm on a `(1, N*C, *)` view
    with the running statistics repeated N times, then averages them back over N). Without it,
    the running statistics normalise, as in `batch_norm`.
    """
    if not use_input_stats:
        return batch_norm(
            x, running_mean, running_var, weight, bias, training=False, momentum=0.0, eps=eps
        )
    if math.prod(x.shape[2:]) == 1:
        raise ValueError(_SPATIAL_SIZE.format(size=torch_size(x.shape)))
    dtype = _stat_dtype(x)
    xc = x.astype(dtype)
    w, b = _channel(weight, x.ndim, dtype), _channel(bias, x.ndim, dtype)
    mean, var = _moments(xc, tuple(range(2, x.ndim)))
    y = _normalize(xc, mean, var, w, b, eps).astype(x.dtype)
    if running_mean is None or running_var is None:
        return y, running_mean, running_var
    n = math.prod(x.shape[2:])
    plane_mean = mean.reshape(x.shape[:2])
    plane_var = _unbiased(var, n).reshape(x.shape[:2])
    new_mean = jnp.mean(_blend(running_mean[None], plane_mean, momentum), axis=0)
    new_var = jnp.mean(_blend(running_var[None], plane_var, momentum), axis=0)
    return y, new_mean, new_var


def layer_norm(
    x: Array,
    normalized_shape: tuple[int, ...],
    weight: Array | None,
    bias: Array | None,
    eps: float,
) -> Array:
    """`F.layer_norm`: normalise over the trailing `normalized_shape` axes (biased variance)."""
    dtype = _stat_dtype(x)
    xc = x.astype(dtype)
    mean, var = _moments(xc, tuple(range(x.ndim - len(normalized_shape), x.ndim)))
    w = None if weight is None else weight.astype(dtype)
    b = None if bias is None else bias.astype(dtype)
    return _normalize(xc, mean, var, w, b, eps).astype(x.dtype)


def group_norm(
    x: Array, num_groups: int, weight: Array | None, bias: Array | None, eps: float
) -> Array:
    """`F.group_norm` on a `(N, C, *)` input: statistics per sample over each group of
    `C // num_groups` channels and all spatial positions, then a per-channel affine map."""
    n, c = x.shape[:2]
    verify_batch_size([n * c // num_groups, num_groups, *x.shape[2:]])
    dtype = _stat_dtype(x)
    grouped = x.astype(dtype).reshape(n, num_groups, -1)
    mean, var = _moments(grouped, (2,))
    y = _normalize(grouped, mean, var, None, None, eps).reshape(x.shape)
    w, b = _channel(weight, x.ndim, dtype), _channel(bias, x.ndim, dtype)
    return _affine(y, w, b).astype(x.dtype)
