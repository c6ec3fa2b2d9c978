"""torch.nn's activation modules: tensor-free `Module`s (PReLU has a weight), as in torch.

They are modules, not functions, so they appear in `named_modules()` exactly where torch lists
them (`Sequential(Linear(2, 3), ReLU())` has a child `1`). Formulas, constants and defaults
are torch's; in particular `GELU()` is the exact erf form (flax's `nn.gelu` defaults to the
tanh approximation) and `Softplus` reverts to the identity above `threshold`, as torch does.

Differences from torch: `inplace` is accepted and has no effect (JAX arrays are immutable).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp

from .._linen.module import Module
from .._parameter import Parameter
from . import _init

Array = jax.Array


def _softmax_dim(dim: int | None, ndim: int, name: str) -> int:
    """torch's `_get_softmax_dim` for `dim=None` (deprecated there too, with this warning)."""
    if dim is not None:
        return dim
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        UserWarning,
        stacklevel=3,
    )
    return 0 if ndim in (0, 1, 3) else 1


class ReLU(Module):
    """`torch.nn.ReLU`: max(0, x)."""

    inplace: bool = False

    def __call__(self, input: Any) -> Array:
        return jax.nn.relu(jnp.asarray(input))


class ReLU6(Module):
    """`torch.nn.ReLU6`: min(max(0, x), 6)."""

    inplace: bool = False

    def __call__(self, input: Any) -> Array:
        return jnp.clip(jnp.asarray(input), 0.0, 6.0)


class LeakyReLU(Module):
    """`torch.nn.LeakyReLU`: x if x > 0 else negative_slope * x."""

    negative_slope: float = 1e-2
    inplace: bool = False

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        return jnp.where(x > 0, x, x * self.negative_slope)


class PReLU(Module):
    """`torch.nn.PReLU(num_parameters=1, init=0.25)`: x if x >= 0 else weight * x, with a
    learnable `weight` of shape `(num_parameters,)` applied along dim 1 (dim 0 for 1-D input).

    torch's `init` argument is stored as the field `init_value` (flax's `Module.init` is a
    method); the constructor accepts `init=` as torch's does.
    """

    num_parameters: int = 1
    init_value: float = 0.25
    dtype: Any = None

    def setup(self) -> None:
        weight = Parameter(_init.constant(self.init_value), (self.num_parameters,), self.dtype)
        self.register_parameter("weight", weight)

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        weight = self.weight
        if self.num_parameters > 1:
            channels = x.shape[1] if x.ndim >= 2 else (x.shape[0] if x.ndim else 1)
            if channels != self.num_parameters:
                raise RuntimeError(
                    f"Mismatch of parameter numbers and input channel size. Found parameter "
                    f"numbers = {self.num_parameters} and channel size = {channels}."
                )
            shape = [1] * x.ndim
            shape[1 if x.ndim >= 2 else 0] = self.num_parameters
            weight = weight.reshape(shape)
        return jnp.where(x >= 0, x, weight * x)


def _accept_torch_init_keyword(cls: Any) -> None:
    dataclass_init = cls.__init__

    def __init__(self: Any, *args: Any, init: float | None = None, **kwargs: Any) -> None:
        if init is not None:
            if "init_value" in kwargs or len(args) > 1:
                raise TypeError("PReLU got multiple values for argument 'init'")
            kwargs["init_value"] = init
        dataclass_init(self, *args, **kwargs)

    cls.__init__ = __init__


_accept_torch_init_keyword(PReLU)


class ELU(Module):
    """`torch.nn.ELU`: x if x > 0 else alpha * (exp(x) - 1)."""

    alpha: float = 1.0
    inplace: bool = False

    def __call__(self, input: Any) -> Array:
        return jax.nn.elu(jnp.asarray(input), self.alpha)


class CELU(Module):
    """`torch.nn.CELU`: max(0, x) + min(0, alpha * (exp(x / alpha) - 1))."""

    alpha: float = 1.0
    inplace: bool = False

    def __call__(self, input: Any) -> Array:
        return jax.nn.celu(jnp.asarray(input), self.alpha)


class SELU(Module):
    """`torch.nn.SELU`: scale * ELU(x, alpha) with torch's (and JAX's) constants."""

    inplace: bool = False

    def __call__(self, input: Any) -> Array:
        return jax.nn.selu(jnp.asarray(input))


class GELU(Module):
    """`torch.nn.GELU(approximate='none')`: x * Phi(x) with the exact erf by default (unlike
    flax's `nn.gelu`); `approximate='tanh'` is torch's (and flax's) tanh approximation."""

    approximate: str = "none"

    def __post_init__(self) -> None:
        if self.approximate not in ("none", "tanh"):
            raise RuntimeError("approximate argument must be either none or tanh.")
        super().__post_init__()

    def __call__(self, input: Any) -> Array:
        return jax.nn.gelu(jnp.asarray(input), approximate=self.approximate == "tanh")


class SiLU(Module):
    """`torch.nn.SiLU`: x * sigmoid(x)."""

    inplace: bool = False

    def __call__(self, input: Any) -> Array:
        return jax.nn.silu(jnp.asarray(input))


class Mish(Module):
    """`torch.nn.Mish`: x * tanh(softplus(x))."""

    inplace: bool = False

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        return x * jnp.tanh(jax.nn.softplus(x))


class Hardswish(Module):
    """`torch.nn.Hardswish`: x * relu6(x + 3) / 6."""

    inplace: bool = False

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        return x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


class Hardsigmoid(Module):
    """`torch.nn.Hardsigmoid`: relu6(x + 3) / 6."""

    inplace: bool = False

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        return jnp.where(x <= -3.0, 0.0, jnp.where(x >= 3.0, 1.0, x / 6.0 + 0.5)).astype(x.dtype)


class Hardtanh(Module):
    """`torch.nn.Hardtanh`: clip(x, min_val, max_val) (torch's deprecated `min_value` /
    `max_value` aliases are not accepted)."""

    min_val: float = -1.0
    max_val: float = 1.0
    inplace: bool = False

    def __post_init__(self) -> None:
        if self.max_val <= self.min_val:
            raise AssertionError("max_val must be greater than min_val")
        super().__post_init__()

    def __call__(self, input: Any) -> Array:
        return jnp.clip(jnp.asarray(input), self.min_val, self.max_val)


class Threshold(Module):
    """`torch.nn.Threshold`: x if x > threshold else value."""

    threshold: float
    value: float
    inplace: bool = False

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        return jnp.where(x > self.threshold, x, jnp.asarray(self.value, x.dtype))


class Tanh(Module):
    """`torch.nn.Tanh`."""

    def __call__(self, input: Any) -> Array:
        return jnp.tanh(jnp.asarray(input))


class Sigmoid(Module):
    """`torch.nn.Sigmoid`."""

    def __call__(self, input: Any) -> Array:
        return jax.nn.sigmoid(jnp.asarray(input))


class LogSigmoid(Module):
    """`torch.nn.LogSigmoid`: log(sigmoid(x)), computed stably."""

    def __call__(self, input: Any) -> Array:
        return jax.nn.log_sigmoid(jnp.asarray(input))


class Softplus(Module):
    """`torch.nn.Softplus`: log(1 + exp(beta * x)) / beta, and x where beta * x > threshold."""

    beta: float = 1.0
    threshold: float = 20.0

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        scaled = x * self.beta
        linear = scaled > self.threshold
        safe = jnp.where(linear, 0.0, scaled)  # no inf in the branch `where` discards
        return jnp.where(linear, x, jnp.log1p(jnp.exp(safe)) / self.beta)


class Softsign(Module):
    """`torch.nn.Softsign`: x / (1 + |x|)."""

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        return x / (1 + jnp.abs(x))


class Tanhshrink(Module):
    """`torch.nn.Tanhshrink`: x - tanh(x)."""

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        return x - jnp.tanh(x)


class GLU(Module):
    """`torch.nn.GLU`: a * sigmoid(b) for the two halves a, b of `dim`."""

    dim: int = -1

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        size = x.shape[self.dim]
        if size % 2:
            raise RuntimeError(
                f"Halving dimension must be even, but dimension {self.dim % x.ndim} is size {size}"
            )
        a, b = jnp.split(x, 2, axis=self.dim)
        return a * jax.nn.sigmoid(b)


class Softmax(Module):
    """`torch.nn.Softmax(dim)`; `dim=None` picks torch's legacy dimension, with its warning."""

    dim: int | None = None

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        return jax.nn.softmax(x, axis=_softmax_dim(self.dim, x.ndim, "softmax"))


class LogSoftmax(Module):
    """`torch.nn.LogSoftmax(dim)`; `dim=None` as in `Softmax`."""

    dim: int | None = None

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        return jax.nn.log_softmax(x, axis=_softmax_dim(self.dim, x.ndim, "log_softmax"))


class Softmin(Module):
    """`torch.nn.Softmin(dim)`: softmax(-x)."""

    dim: int | None = None

    def __call__(self, input: Any) -> Array:
        x = jnp.asarray(input)
        return jax.nn.softmax(-x, axis=_softmax_dim(self.dim, x.ndim, "softmin"))
