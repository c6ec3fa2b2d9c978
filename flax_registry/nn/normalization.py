"""`LayerNorm` and `GroupNorm`, the counterparts of `torch.nn.LayerNorm` / `torch.nn.GroupNorm`.

Neither holds buffers nor behaves differently in training: their `__call__` accepts the
package's `train` keyword (see `batchnorm.py`) only so that every layer can be called alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .._linen.module import Module
from .._messages import torch_size
from .._parameter import Parameter
from ._norm_functional import group_norm, layer_norm


def register_affine(
    module: Module, shape: tuple[int, ...], affine: bool, bias: bool, dtype: Any
) -> None:
    """Register a norm's `weight` (ones) and `bias` (zeros) of `shape` as torch's norm layers
    do: both None when not `affine`, `bias` None when `bias=False`."""
    ones = Parameter(nn.initializers.ones, shape, dtype) if affine else None
    zeros = Parameter(nn.initializers.zeros, shape, dtype) if affine and bias else None
    module.register_parameter("weight", ones)
    module.register_parameter("bias", zeros)


class LayerNorm(Module):
    """`torch.nn.LayerNorm`: normalise over the trailing `normalized_shape` axes with the biased
    variance, then `* weight + bias` elementwise (`weight` ones and `bias` zeros of shape
    `normalized_shape`; `bias=False` registers `bias` as `None`, `elementwise_affine=False`
    both).

    Differences from PyTorch: an empty `normalized_shape` raises at setup rather than at the
    first call; `dtype` is the factory dtype of the parameters (float32 by default), and there
    is no `device` argument. Unlike `flax.linen.LayerNorm`, the parameters are named and shaped
    as PyTorch's and the variance is the two-pass one.
    """

    normalized_shape: int | Sequence[int]
    eps: float = 1e-5
    elementwise_affine: bool = True
    bias: bool = True
    dtype: Any = None

    def setup(self) -> None:
        shape = self._shape()
        if not shape:
            raise RuntimeError(
                "Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
                "least one element, but got normalized_shape = []"
            )
        register_affine(self, shape, self.elementwise_affine, self.bias, self.dtype)

    def _shape(self) -> tuple[int, ...]:
        ns = self.normalized_shape
        return (int(ns),) if isinstance(ns, int) else tuple(int(d) for d in ns)

    def __call__(self, x: Any, *, train: bool = False) -> jax.Array:
        """Normalise `x` (`train` has no effect, as in PyTorch)."""
        x = jnp.asarray(x)
        shape = self._shape()
        if x.ndim < len(shape) or tuple(x.shape[x.ndim - len(shape) :]) != shape:
            raise RuntimeError(
                f"Given normalized_shape={torch_size(shape)}, expected input with shape "
                f"[*, {torch_size(shape)[1:-1]}], but got input of size{torch_size(x.shape)}"
            )
        weight = self.get_parameter("weight") if self.elementwise_affine else None
        bias = self.get_parameter("bias") if self.elementwise_affine and self.bias else None
        return layer_norm(x, shape, weight, bias, self.eps)


class GroupNorm(Module):
    """`torch.nn.GroupNorm`: split the channels (axis 1 of a `(N, C, *)` input) into
    `num_groups` groups, normalise each group of each sample with the biased variance, then
    apply a per-channel `weight` (ones) and `bias` (zeros) when `affine` (`bias=False`
    registers `bias` as `None`, as PyTorch's keyword-only `bias`).

    Differences from PyTorch: `dtype` is the parameters' factory dtype (float32 by default) and
    there is no `device` argument. Unlike `flax.linen.GroupNorm`, inputs are channels-first.
    """

    num_groups: int
    num_channels: int
    eps: float = 1e-5
    affine: bool = True
    dtype: Any = None
    bias: bool = True

    def setup(self) -> None:
        if self.num_channels % self.num_groups != 0:
            raise ValueError(
                f"num_channels ({self.num_channels}) must be divisible by "
                f"num_groups ({self.num_groups})"
            )
        n = self.num_channels
        register_affine(self, (n,), self.affine, self.bias, self.dtype)

    def __call__(self, x: Any, *, train: bool = False) -> jax.Array:
        """Normalise `x` (`train` has no effect, as in PyTorch)."""
        x = jnp.asarray(x)
        if x.ndim < 2:
            raise RuntimeError(
                f"Expected at least 2 dimensions for input tensor but received {x.ndim}"
            )
        channels = x.shape[1]
        if channels % self.num_groups != 0:
            raise RuntimeError(
                "Expected number of channels in input to be divisible by num_groups, but got "
                f"input of shape {torch_size(x.shape)} and num_groups={self.num_groups}"
            )
        if self.affine and channels != self.num_channels:
            raise RuntimeError(
                "Expected weight to be a vector of size equal to the number of channels in "
                f"input, but got weight of shape [{self.num_channels}] and input of shape "
                f"{torch_size(x.shape)}"
            )
        weight = self.get_parameter("weight") if self.affine else None
        bias = self.get_parameter("bias") if self.affine and self.bias else None
        return group_norm(x, self.num_groups, weight, bias, self.eps)
