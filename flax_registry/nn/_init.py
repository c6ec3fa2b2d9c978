"""torch.nn.init as flax-style initializers: `init(key, shape, dtype) -> array`.

Each factory returns an initializer that draws from the same distribution as the
`torch.nn.init` function of the same name applied to a tensor of `shape` (in torch layout:
`(out, in, *kernel)` for Linear and Conv weights, `(in, out / groups, *kernel)` for
ConvTranspose), so that fans are computed exactly as torch computes them. The numbers differ
(JAX's random streams are not torch's); the distributions do not.

Difference from torch: nothing is modified in place; the initializer returns a new array, and
`Parameter(init, shape)` calls it with the module's `params` rng.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[[Any, Sequence[int], Any], Array]
FanMode = Literal["fan_in", "fan_out"]

_LINEAR_GAINS = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
)


def calculate_fan_in_and_fan_out(shape: Sequence[int]) -> tuple[int, int]:
    """`torch.nn.init._calculate_fan_in_and_fan_out` on a shape: `(size(1) * receptive,
    size(0) * receptive)` with `receptive` the product of the dimensions after the second."""
    if len(shape) < 2:
        raise ValueError(
            "Fan in and fan out can not be computed for tensor with fewer than 2 dimensions"
        )
    receptive = math.prod(shape[2:])
    return int(shape[1]) * receptive, int(shape[0]) * receptive


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """`torch.nn.init.calculate_gain`, same table and messages."""
    if nonlinearity in _LINEAR_GAINS:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, int | float) and not isinstance(param, bool):
            slope = float(param)
        else:
            raise ValueError(f"negative_slope {param} not a valid number")
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"Unsupported nonlinearity {nonlinearity}")


def _fan(shape: Sequence[int], mode: FanMode) -> int:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"Mode {mode} not supported, please use one of fan_in, fan_out")
    fan_in, fan_out = calculate_fan_in_and_fan_out(shape)
    return fan_in if mode == "fan_in" else fan_out


def uniform(a: float = 0.0, b: float = 1.0) -> Initializer:
    """`torch.nn.init.uniform_`: U(a, b)."""

    def init(key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, tuple(shape), dtype, a, b)

    return init


def normal(mean: float = 0.0, std: float = 1.0) -> Initializer:
    """`torch.nn.init.normal_`: N(mean, std^2)."""

    def init(key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return mean + std * jax.random.normal(key, tuple(shape), dtype)

    return init


def trunc_normal(
    mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
) -> Initializer:
    """`torch.nn.init.trunc_normal_`: N(mean, std^2) truncated to [a, b] (absolute bounds,
    as torch's, not multiples of std)."""

    def init(key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        lower, upper = (a - mean) / std, (b - mean) / std
        return mean + std * jax.random.truncated_normal(key, lower, upper, tuple(shape), dtype)

    return init


def constant(val: float) -> Initializer:
    """`torch.nn.init.constant_`."""

    def init(key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        del key
        return jnp.full(tuple(shape), val, dtype)

    return init


def zeros() -> Initializer:
    """`torch.nn.init.zeros_`."""
    return constant(0.0)


def ones() -> Initializer:
    """`torch.nn.init.ones_`."""
    return constant(1.0)


def xavier_uniform(gain: float = 1.0) -> Initializer:
    """`torch.nn.init.xavier_uniform_`: U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out))."""

    def init(key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        fan_in, fan_out = calculate_fan_in_and_fan_out(shape)
        bound = gain * math.sqrt(6.0 / float(fan_in + fan_out))
        return jax.random.uniform(key, tuple(shape), dtype, -bound, bound)

    return init


def xavier_normal(gain: float = 1.0) -> Initializer:
    """`torch.nn.init.xavier_normal_`: N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))."""

    def init(key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        fan_in, fan_out = calculate_fan_in_and_fan_out(shape)
        std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
        return std * jax.random.normal(key, tuple(shape), dtype)

    return init


def kaiming_uniform(
    a: float = 0.0, mode: FanMode = "fan_in", nonlinearity: str = "leaky_relu"
) -> Initializer:
    """`torch.nn.init.kaiming_uniform_`: U(-b, b), b = gain * sqrt(3 / fan).

    torch's default for Linear and Conv weights is `kaiming_uniform(a=math.sqrt(5))`, which
    is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """

    def init(key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        if 0 in tuple(shape):
            return jnp.zeros(tuple(shape), dtype)
        fan = _fan(shape, mode)
        bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / fan)
        return jax.random.uniform(key, tuple(shape), dtype, -bound, bound)

    return init


def kaiming_normal(
    a: float = 0.0, mode: FanMode = "fan_in", nonlinearity: str = "leaky_relu"
) -> Initializer:
    """`torch.nn.init.kaiming_normal_`: N(0, std^2), std = gain / sqrt(fan)."""

    def init(key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        if 0 in tuple(shape):
            return jnp.zeros(tuple(shape), dtype)
        fan = _fan(shape, mode)
        std = calculate_gain(nonlinearity, a) / math.sqrt(fan)
        return std * jax.random.normal(key, tuple(shape), dtype)

    return init


def default_weight() -> Initializer:
    """torch's `reset_parameters()` weight init for Linear / Conv / ConvTranspose:
    `kaiming_uniform_(weight, a=math.sqrt(5))`."""
    return kaiming_uniform(a=math.sqrt(5))


def default_bias(weight_shape: Sequence[int]) -> Initializer:
    """torch's `reset_parameters()` bias init for Linear / Conv / ConvTranspose:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in of the weight (0 bound when fan_in is 0)."""
    fan_in, _ = calculate_fan_in_and_fan_out(weight_shape)
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return uniform(-bound, bound)
