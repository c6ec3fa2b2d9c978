"""`BatchNorm1d/2d/3d`, the counterparts of `torch.nn.BatchNorm*`, number for number.

Train vs eval (the convention of the whole `flax_registry.nn` package, jit-safe): the layer is
called as `layer(x, train=False)`. `train=False` is PyTorch's eval mode (`model.eval()`): the
running statistics normalise and nothing changes, so `model.apply(variables, x)` is inference.
`flax_registry.apply(model, variables, x, train=True)` is PyTorch's `model.train(); model(x)`: the
batch statistics normalise, and `running_mean`, `running_var` and `num_batches_tracked` are
updated in the returned variables. `train` is a Python bool: under `jax.jit` mark it static.

Across data-parallel replicas (a batch sharded over a mesh), batch statistics are global by
default: the whole batch's, as `torch.nn.SyncBatchNorm` computes them and as a single device
would; `stats="per_replica"` (or `flax_registry.nn.mode.replicas(n, "per_replica")` for the
whole model) gives PyTorch DDP's per-replica statistics instead. `SyncBatchNorm` is the layer
that always uses global statistics, whatever the model-wide setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .._linen.module import Module
from ._norm_functional import batch_norm
from .mode import GLOBAL, PER_REPLICA, check_batch_stats, current_replicas
from .normalization import register_affine

_CHANNELS = (
    "{tensor} should contain {found} elements not {expected} ({cls}(num_features={expected}) got "
    "an input of shape {shape}, whose channel axis {axis} has {found} entries: inputs are "
    "channels-first as in PyTorch, e.g. (N, C, H, W); transpose the input or pass "
    "num_features={found})"
)


def _zero_counter() -> jax.Array:
    """torch's `num_batches_tracked` is int64; JAX makes it int32 unless jax_enable_x64 is on
    (looked up at init, so that enabling x64 after import counts)."""
    return jnp.zeros((), jax.dtypes.canonicalize_dtype(np.int64))


class _NormBase(Module):
    """What BatchNorm and InstanceNorm register, as PyTorch's `_NormBase.__init__`:
    parameters `weight` (ones) and `bias` (zeros) when `affine`, and buffers `running_mean`
    (zeros), `running_var` (ones) and `num_batches_tracked` (0, an integer) when
    `track_running_stats`; otherwise each is registered as `None` and left out of `state_dict`.

    `dtype` is PyTorch's factory `dtype` (parameters and float buffers; float32 by default);
    `num_batches_tracked` is int64 in PyTorch and int32 in JAX unless `jax_enable_x64` is on
    (it loads from and converts to PyTorch's int64 exactly). PyTorch's `device` argument has no
    counterpart: place arrays with JAX.
    """

    _version: ClassVar[int] = 2
    _added_in_version: ClassVar[Mapping[str, int]] = {"num_batches_tracked": 2}

    num_features: int
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    dtype: Any = None
    bias: bool = True

    def setup(self) -> None:
        n = self.num_features
        register_affine(self, (n,), self.affine, self.bias, self.dtype)
        if self.track_running_stats:
            dtype = jnp.float32 if self.dtype is None else self.dtype
            self.register_buffer("running_mean", lambda: jnp.zeros((n,), dtype))
            self.register_buffer("running_var", lambda: jnp.ones((n,), dtype))
            self.register_buffer("num_batches_tracked", _zero_counter)
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def _affine_params(self) -> tuple[jax.Array | None, jax.Array | None]:
        if not self.affine:
            return None, None
        return self.get_parameter("weight"), self.get_parameter("bias") if self.bias else None

    def _running_stats(self) -> tuple[jax.Array | None, jax.Array | None]:
        if not self.track_running_stats:
            return None, None
        return self.get_buffer("running_mean"), self.get_buffer("running_var")

    def _check_channels(self, x: jax.Array, axis: int, found: int, expected: int) -> None:
        if found == expected:
            return
        tensor = "running_mean" if self.track_running_stats else "weight" if self.affine else None
        if tensor is not None:
            raise RuntimeError(
                _CHANNELS.format(
                    tensor=tensor,
                    found=found,
                    expected=expected,
                    cls=type(self).__name__,
                    shape=tuple(x.shape),
                    axis=axis,
                )
            )


class _BatchNorm(_NormBase):
    """Batch normalization over the channel axis 1, as `torch.nn.modules.batchnorm._BatchNorm`.

    Training (`train=True`) normalises with the batch mean and BIASED batch variance and, when
    tracking, updates `running_var` with the UNBIASED variance, as PyTorch does. `momentum=None`
    is PyTorch's cumulative moving average: the factor is `1 / num_batches_tracked` after the
    increment. Eval (`train=False`) normalises with the running statistics when tracking, and
    with the batch statistics otherwise (as PyTorch with `track_running_stats=False`).

    `stats`: how batch statistics are computed across data-parallel replicas (see
    `flax_registry.nn.mode.replicas`): "global" (over the whole batch, `SyncBatchNorm`),
    "per_replica" (each replica's part of the batch on its own, the running statistics from
    the first replica's part: PyTorch DDP's default with `broadcast_buffers=True`), or None
    (the model-wide setting, "global" unless the step says otherwise). With one replica both
    are PyTorch's single-process BatchNorm.

    Differences from PyTorch: the buffers change only in the variables returned by
    `flax_registry.apply` (or `apply(..., mutable=['buffers'])`); a train-mode call with
    immutable buffers raises instead of silently skipping the update. The running-statistics
    update carries no gradient, as in PyTorch.
    """

    _ndims: ClassVar[tuple[int, ...]] = ()

    stats: str | None = None

    def _groups(self) -> int:
        """How many parts of the batch are normalised on their own (1: the whole batch)."""
        setting = current_replicas()
        mode = setting.batch_stats if self.stats is None else check_batch_stats(self.stats)
        return setting.count if mode == PER_REPLICA else 1

    def __call__(self, x: Any, *, train: bool = False) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim not in self._ndims:
            wanted = " or ".join(f"{d}D" for d in self._ndims)
            raise ValueError(f"expected {wanted} input (got {x.ndim}D input)")
        self._check_channels(x, 1, x.shape[1], self.num_features)
        tracking = self.track_running_stats
        momentum: Any = 0.0 if self.momentum is None else self.momentum
        if train and tracking:
            count = self.get_buffer("num_batches_tracked") + 1
            self.update_buffer("num_batches_tracked", count)
            if self.momentum is None:
                momentum = 1.0 / count.astype(jnp.promote_types(x.dtype, jnp.float32))
        running_mean, running_var = self._running_stats()
        weight, bias = self._affine_params()
        y, new_mean, new_var = batch_norm(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            training=train or not tracking,
            momentum=momentum,
            eps=self.eps,
            groups=self._groups() if train or not tracking else 1,
        )
        if train and tracking:
            self.update_buffer("running_mean", new_mean)
            self.update_buffer("running_var", new_var)
        return y


class BatchNorm1d(_BatchNorm):
    """`torch.nn.BatchNorm1d`: input `(N, C)` or `(N, C, L)`; see `_BatchNorm`."""

    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """`torch.nn.BatchNorm2d`: input `(N, C, H, W)`; see `_BatchNorm`."""

    _ndims = (4,)


class BatchNorm3d(_BatchNorm):
    """`torch.nn.BatchNorm3d`: input `(N, C, D, H, W)`; see `_BatchNorm`."""

    _ndims = (5,)


class SyncBatchNorm(_BatchNorm):
    """`torch.nn.SyncBatchNorm`: batch statistics over the whole batch across every replica,
    whatever the model-wide setting; input `(N, C, *)` of 2 to 5 dimensions; see `_BatchNorm`.

    Differences from PyTorch: no `process_group` (the mesh axes the batch is sharded over
    are the group) and nothing to convert: under `jax.jit` the statistics of a sharded batch
    are the global ones; PyTorch's single-process fallback to `BatchNorm` is the same math.
    """

    _ndims = (2, 3, 4, 5)

    stats: str | None = GLOBAL
