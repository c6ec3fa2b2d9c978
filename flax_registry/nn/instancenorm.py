"""`InstanceNorm1d/2d/3d`, the counterparts of `torch.nn.InstanceNorm*`, number for number.

Train vs eval follows the package convention (see `batchnorm.py`): `layer(x, train=False)` is
PyTorch's eval mode, `flax_registry.apply(model, variables, x, train=True)` its train mode.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from ._norm_functional import instance_norm
from .batchnorm import _NormBase

_RUNNING_CHANNELS = (
    "running_mean should contain {found} elements not {expected} ({cls}(num_features={n}) got "
    "an input of shape {shape}, whose channel axis {axis} has {c} entries: inputs are "
    "channels-first as in PyTorch; transpose the input or pass num_features={c})"
)


class _InstanceNorm(_NormBase):
    """Instance normalization, as `torch.nn.modules.instancenorm._InstanceNorm`: each
    `(sample, channel)` plane is normalised by its own mean and biased variance.

    Defaults differ from BatchNorm as in PyTorch: `affine=False`, `track_running_stats=False`
    (so by default the layer holds no tensors at all). With `track_running_stats=True` it
    registers `running_mean`, `running_var` and `num_batches_tracked`; `train=True` moves the
    running statistics towards the per-plane mean and UNBIASED variance averaged over the batch,
    and eval (`train=False`) normalises with them. Exactly as in PyTorch, `num_batches_tracked`
    is registered but never incremented, and `momentum=None` means a factor of 0 (the running
    statistics never move), not BatchNorm's cumulative average.

    An unbatched input (one dimension fewer) is normalised as a batch of one. A channel count
    other than `num_features` raises when `affine` (or, from the running statistics, when
    tracking); otherwise it only warns, as in PyTorch, since `num_features` is then unused.
    """

    affine: bool = False
    track_running_stats: bool = False

    _no_batch_dim: ClassVar[int] = 0

    def __call__(self, x: Any, *, train: bool = False) -> jax.Array:
        x = jnp.asarray(x)
        nb = self._no_batch_dim
        if x.ndim not in (nb, nb + 1):
            raise ValueError(f"expected {nb}D or {nb + 1}D input (got {x.ndim}D input)")
        axis = x.ndim - nb
        channels = x.shape[axis]
        if channels != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={axis} to match num_features"
                    f" ({self.num_features}), but got: {channels}."
                )
            warnings.warn(
                f"input's size at dim={axis} does not match num_features. "
                "You can silence this warning by not passing in num_features, "
                "which is not used because affine=False",
                stacklevel=2,
            )
        unbatched = x.ndim == nb
        xb = x[None] if unbatched else x
        tracking = self.track_running_stats
        if tracking and channels != self.num_features:
            raise RuntimeError(
                _RUNNING_CHANNELS.format(
                    found=xb.shape[0] * channels,
                    expected=xb.shape[0] * self.num_features,
                    cls=type(self).__name__,
                    n=self.num_features,
                    shape=tuple(x.shape),
                    axis=axis,
                    c=channels,
                )
            )
        running_mean, running_var = self._running_stats()
        weight, bias = self._affine_params()
        y, new_mean, new_var = instance_norm(
            xb,
            running_mean,
            running_var,
            weight,
            bias,
            use_input_stats=train or not tracking,
            momentum=0.0 if self.momentum is None else self.momentum,
            eps=self.eps,
        )
        if train and tracking:
            self.update_buffer("running_mean", new_mean)
            self.update_buffer("running_var", new_var)
        return y[0] if unbatched else y


class InstanceNorm1d(_InstanceNorm):
    """`torch.nn.InstanceNorm1d`: input `(N, C, L)` or unbatched `(C, L)`; see `_InstanceNorm`."""

    _no_batch_dim = 2


class InstanceNorm2d(_InstanceNorm):
    """`torch.nn.InstanceNorm2d`: input `(N, C, H, W)` or `(C, H, W)`; see `_InstanceNorm`."""

    _no_batch_dim = 3


class InstanceNorm3d(_InstanceNorm):
    """`torch.nn.InstanceNorm3d`: input `(N, C, D, H, W)` or `(C, D, H, W)`; see `_InstanceNorm`."""

    _no_batch_dim = 4
