"""`Dropout`, `Dropout1d/2d/3d`: torch.nn's dropout with an explicit train flag.

`__call__(input, train=False)`: `train=False` is torch's eval mode (the identity);
`train=True` is torch's training mode: each element (or, for `Dropout1d/2d/3d`, each channel)
is zeroed with probability `p` and the survivors are scaled by `1 / (1 - p)` (inverted
dropout, as torch). The random draws come from the `'dropout'` rng stream:
`fr.apply(model, variables, x, train=True, rngs={'dropout': key})` is torch's
`model.train(); model(x)` (see `flax_registry.nn.mode`).

Differences from torch: the mask comes from JAX's random stream, so the zeroed positions
differ from torch's for the same seed; `inplace` is accepted and has no effect.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from .._linen.module import Module

Array = jax.Array

RNG_STREAM = "dropout"

_DROPOUT2D_3D = (
    "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D dropout "
    "behavior is desired - input is interpreted as shape (N, C, L), where C is the channel "
    "dim. This behavior will change in a future release to interpret the input as one "
    "without a batch dimension, i.e. shape (C, H, W). To maintain the 1D channel-wise "
    "dropout behavior, please switch to using dropout1d instead."
)

_NO_RNG = (
    "{cls} needs random numbers for dropout (p={p}) in training mode (train=True) but no "
    "'{stream}' rng was given. Pass one, e.g. fr.apply(model, variables, x, train=True, "
    "rngs={{'{stream}': jax.random.key(0)}}), or call with train=False for evaluation."
)


def dropout(module: Module, x: Array, p: float, mask_shape: tuple[int, ...] | None = None) -> Array:
    """Inverted dropout in training mode, torch's `F.dropout(x, p, training=True)`: zero each
    element (or each position of a broadcast `mask_shape`) with probability `p`, scale the
    rest by `1 / (1 - p)`, drawing from `module`'s `'dropout'` rng stream."""
    if p == 0:
        return x
    if p >= 1:
        return jnp.zeros_like(x)
    if not module.has_rng(RNG_STREAM):
        raise ValueError(_NO_RNG.format(cls=type(module).__name__, p=p, stream=RNG_STREAM))
    keep = jax.random.bernoulli(module.make_rng(RNG_STREAM), 1.0 - p, mask_shape or x.shape)
    return jnp.where(keep, x * (1.0 / (1.0 - p)), jnp.zeros((), x.dtype)).astype(x.dtype)


class _DropoutNd(Module):
    p: float = 0.5
    inplace: bool = False

    # Number of spatial dims per channel (0: element-wise dropout).
    _CHANNEL_DIMS: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        if not 0 <= self.p <= 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {self.p}")
        super().__post_init__()

    def _mask_shape(self, x: Array) -> tuple[int, ...]:
        n = self._CHANNEL_DIMS
        if n is None:
            return x.shape
        if x.ndim not in (n + 1, n + 2):
            raise RuntimeError(
                f"{type(self).__name__}: Expected {n + 1}D or {n + 2}D input, but received a "
                f"{x.ndim}D input. {type(self).__name__} zeroes whole channels of "
                f"(N, C, *spatial) or (C, *spatial) inputs."
            )
        channel_axes = x.ndim - n
        return (*x.shape[:channel_axes], *([1] * n))

    def __call__(self, input: Any, train: bool = False) -> Array:
        x = jnp.asarray(input)
        shape = self._mask_shape(x)
        return dropout(self, x, self.p, shape) if train else x


class Dropout(_DropoutNd):
    """`torch.nn.Dropout(p=0.5)`: element-wise inverted dropout when `train=True`."""


class Dropout1d(_DropoutNd):
    """`torch.nn.Dropout1d`: zeroes whole channels of `(N, C, L)` / `(C, L)` inputs."""

    _CHANNEL_DIMS: ClassVar[int | None] = 1


class Dropout2d(_DropoutNd):
    """`torch.nn.Dropout2d`: zeroes whole channels of `(N, C, H, W)` inputs.

    As torch (2.x), a 3-D input is read as `(N, C, L)`, not as an unbatched `(C, H, W)`, with
    torch's warning; use `Dropout1d` for that, or add the batch axis.
    """

    _CHANNEL_DIMS: ClassVar[int | None] = 2

    def _mask_shape(self, x: Array) -> tuple[int, ...]:
        if x.ndim == 3:
            warnings.warn(_DROPOUT2D_3D, UserWarning, stacklevel=3)
        elif x.ndim != 4:
            raise RuntimeError(
                f"Dropout2d: Expected 4D input (N, C, H, W), but received a {x.ndim}D input."
            )
        return (*x.shape[:2], *([1] * (x.ndim - 2)))


class Dropout3d(_DropoutNd):
    """`torch.nn.Dropout3d`: zeroes whole channels of `(N, C, D, H, W)` / `(C, D, H, W)`."""

    _CHANNEL_DIMS: ClassVar[int | None] = 3
