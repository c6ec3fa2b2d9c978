"""`Linear`, `Identity`, `Flatten`, `Unflatten`: torch.nn's linear and reshaping layers.

Constructor arguments, parameter names, layouts and initial distributions are torch's:
`Linear.weight` has shape `(out_features, in_features)` and the forward pass contracts the
input's last axis with the weight's second one (no transpose is materialised).

Differences from torch: there is no `device` argument (placement is JAX's business); `dtype`
is the parameter dtype (float32 when None); `precision` (not in torch) is passed to
`jax.lax.dot_general` (on GPU/TPU JAX's default may use reduced-precision matmuls, as torch's
`allow_tf32` does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .._linen.module import Module
from .._parameter import Parameter
from . import _init

Array = jax.Array


class Identity(Module):
    """`torch.nn.Identity`: returns its input. torch accepts and ignores any constructor
    argument; a flax module is a dataclass, so this one takes none."""

    def __call__(self, input: Any) -> Any:
        return input


class Linear(Module):
    """`torch.nn.Linear`: `y = x @ weight.T + bias`, weight `(out_features, in_features)`.

    Initialisation as torch's `reset_parameters`: weight ~ kaiming_uniform(a=sqrt(5)), i.e.
    U(-1/sqrt(in_features), 1/sqrt(in_features)), and bias ~ the same bound.
    `self.bias` is the constructor argument; the tensor is `get_parameter("bias")`.
    """

    in_features: int
    out_features: int
    bias: bool = True
    dtype: Any = None
    precision: Any = None

    def setup(self) -> None:
        shape = (self.out_features, self.in_features)
        self.register_parameter("weight", Parameter(_init.default_weight(), shape, self.dtype))
        bias = Parameter(_init.default_bias(shape), (self.out_features,), self.dtype)
        self.register_parameter("bias", bias if self.bias else None)

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        weight = self.weight
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            rows = math.prod(x.shape[:-1]) if x.ndim > 1 else 1
            cols = x.shape[-1] if x.ndim else 0
            raise RuntimeError(
                f"mat1 and mat2 shapes cannot be multiplied ({rows}x{cols} and "
                f"{self.in_features}x{self.out_features}): {type(self).__name__} expects "
                f"inputs whose last dimension is in_features={self.in_features}."
            )
        y = jax.lax.dot_general(
            x, weight, (((x.ndim - 1,), (1,)), ((), ())), precision=self.precision
        )
        if self.bias:
            y = y + self.get_parameter("bias")
        return y


class Flatten(Module):
    """`torch.nn.Flatten(start_dim=1, end_dim=-1)`: merges dimensions start_dim..end_dim."""

    start_dim: int = 1
    end_dim: int = -1

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        if x.ndim == 0:
            return x.reshape(1)
        start = _dim(self.start_dim, x.ndim)
        end = _dim(self.end_dim, x.ndim)
        if start > end:
            raise RuntimeError("flatten() has invalid args: start_dim cannot come after end_dim")
        return x.reshape((*x.shape[:start], -1, *x.shape[end + 1 :]))


class Unflatten(Module):
    """`torch.nn.Unflatten(dim, unflattened_size)`: splits dimension `dim` into
    `unflattened_size` (a sequence of ints, one of which may be -1). torch's named-tensor
    form (a tuple of (name, size) pairs) is not supported."""

    dim: int
    unflattened_size: Sequence[int]

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        dim = _dim(self.dim, x.ndim)
        sizes = [int(s) for s in self.unflattened_size]
        known = math.prod(s for s in sizes if s != -1)
        if sizes.count(-1) > 1 or (
            x.shape[dim] != known if -1 not in sizes else known == 0 or x.shape[dim] % known
        ):
            raise RuntimeError(
                f"unflatten: Provided sizes {sizes} don't multiply up to the size of dim "
                f"{self.dim} ({x.shape[dim]}) in the input tensor"
            )
        return x.reshape((*x.shape[:dim], *sizes, *x.shape[dim + 1 :]))


def _dim(dim: int, ndim: int) -> int:
    """A dimension index wrapped as torch wraps it, with torch's IndexError."""
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], "
            f"but got {dim})"
        )
    return dim % ndim
