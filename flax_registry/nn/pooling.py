"""Max, average and adaptive pooling with torch.nn's arguments, output sizes and divisors.

Inputs are channels-first, `(N, C, *spatial)` or unbatched `(C, *spatial)`. Output sizes follow
torch's `pooling_output_shape` (including `ceil_mode`, whose last window must start inside the
input or its left padding); average pooling divides by torch's divisor (`count_include_pad`
counts the explicit padding but never the extra `ceil_mode` overhang; `divisor_override`
replaces it); adaptive pooling uses torch's windows `[floor(i * L / out), ceil((i + 1) * L / out))`,
so non-divisible sizes give overlapping windows exactly as torch's.

Max pooling runs on `lax.reduce_window`; with `dilation > 1` (whose reduce_window gradient JAX
does not implement) it takes the first maximum of the strided window slices, which is also
where torch sends the gradient when a window holds ties.

Differences from torch: `return_indices=True` is not supported (raises at construction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._linen.module import Module

Array = jax.Array


def _tuple(value: Any, n: int, what: str, cls: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, Sequence) and len(value) == n:
        return tuple(int(v) for v in value)
    if isinstance(value, Sequence) and len(value) == 1:
        return (int(value[0]),) * n
    raise ValueError(f"{cls}: {what} must be an int or a sequence of {n} ints, got {value!r}")


def _batched(x: Array, n: int) -> tuple[Array, bool]:
    if x.ndim not in (n + 1, n + 2) or x.size == 0:
        raise RuntimeError(
            f"non-empty {n + 1}D or {n + 2}D (batch mode) tensor expected for input, "
            f"got shape {tuple(x.shape)}"
        )
    return (x, True) if x.ndim == n + 2 else (x[None], False)


def _output_size(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """torch's `pooling_output_shape`."""
    numerator = size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)
    out = numerator // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


class _PoolNd(Module):
    """Geometry shared by max and average pooling: kernel, stride (default kernel), padding."""

    _N: ClassVar[int] = 0
    _DILATION: ClassVar[bool] = False

    def _t(self, what: str) -> tuple[int, ...]:
        value = getattr(self, what, 1)
        if what == "stride" and (value is None or value == ()):
            value = self.kernel_size  # type: ignore[attr-defined]
        return _tuple(value, self._N, what, type(self).__name__)

    def _check_geometry(self) -> None:
        kernel, stride, padding = self._t("kernel_size"), self._t("stride"), self._t("padding")
        dilation = self._t("dilation") if self._DILATION else (1,) * self._N
        for what, values in (("kernel_size", kernel), ("stride", stride), ("dilation", dilation)):
            if any(v <= 0 for v in values):
                raise ValueError(f"{type(self).__name__}: {what} must be greater than zero")
        for k, p, d in zip(kernel, padding, dilation):
            if p < 0 or p > ((k - 1) * d + 1) // 2:
                raise RuntimeError(
                    "pad should be at most half of effective kernel size, but got "
                    f"pad={p}, kernel_size={k} and dilation={d}"
                )

    def _geometry(self, x: Array) -> tuple[list[int], list[tuple[int, int]]]:
        """Output sizes and the (low, high) padding that makes every window fit."""
        kernel, stride, padding = self._t("kernel_size"), self._t("stride"), self._t("padding")
        dilation = self._t("dilation") if self._DILATION else (1,) * self._N
        ceil = bool(self.ceil_mode)  # type: ignore[attr-defined]
        spatial = x.shape[2:]
        outs = [
            _output_size(L, k, s, p, d, ceil)
            for L, k, s, p, d in zip(spatial, kernel, stride, padding, dilation)
        ]
        if any(o <= 0 for o in outs):
            size = "x".join(map(str, (x.shape[1], *spatial)))
            out = "x".join(map(str, (x.shape[1], *outs)))
            raise RuntimeError(
                f"Given input size: ({size}). Calculated output size: ({out}). "
                "Output size is too small"
            )
        pads = [
            (p, max(0, (o - 1) * s + d * (k - 1) + 1 - L - p))
            for L, o, k, s, p, d in zip(spatial, outs, kernel, stride, padding, dilation)
        ]
        return outs, pads


def _crop(y: Array, outs: Sequence[int]) -> Array:
    return y[(slice(None), slice(None), *(slice(0, o) for o in outs))]


class _MaxPoolNd(_PoolNd):
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] | None = None
    padding: int | Sequence[int] = 0
    dilation: int | Sequence[int] = 1
    return_indices: bool = False
    ceil_mode: bool = False

    _DILATION: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.return_indices:
            raise NotImplementedError(
                f"{type(self).__name__}(return_indices=True) is not supported by flax_registry; "
                "compute the indices with jnp.argmax over the windows if you need them."
            )
        self._check_geometry()
        super().__post_init__()

    def __call__(self, input: Any) -> Array:
        x, batched = _batched(jnp.asarray(input), self._N)
        outs, pads = self._geometry(x)
        # A numpy scalar (not a traced value) lets lax.reduce_window recognise the max
        # monoid, which is what makes it differentiable under jit.
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        lowest = np.array(-np.inf if floating else jnp.iinfo(x.dtype).min, x.dtype)
        kernel, stride, dilation = self._t("kernel_size"), self._t("stride"), self._t("dilation")
        if all(d == 1 for d in dilation):
            y = lax.reduce_window(
                x,
                lowest,
                lax.max,
                (1, 1, *kernel),
                (1, 1, *stride),
                ((0, 0), (0, 0), *pads),
            )
        else:
            y = _dilated_max(x, outs, pads, kernel, stride, dilation, lowest)
        y = _crop(y, outs)
        return y if batched else y[0]


def _dilated_max(
    x: Array,
    outs: Sequence[int],
    pads: Sequence[tuple[int, int]],
    kernel: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    lowest: Any,
) -> Array:
    """Max over the strided slices of each kernel offset; the first maximum wins (torch's)."""
    x = jnp.pad(x, ((0, 0), (0, 0), *pads), constant_values=lowest)
    windows = []
    for offset in np.ndindex(*kernel):
        index = tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, n, s in zip(offset, dilation, outs, stride)
        )
        windows.append(x[(slice(None), slice(None), *index)])
    stacked = jnp.stack(windows, axis=-1)
    first = jnp.argmax(stacked, axis=-1, keepdims=True)
    return jnp.take_along_axis(stacked, first, axis=-1)[..., 0]


class MaxPool1d(_MaxPoolNd):
    """`torch.nn.MaxPool1d`: input `(N, C, L)` or `(C, L)`."""

    _N: ClassVar[int] = 1


class MaxPool2d(_MaxPoolNd):
    """`torch.nn.MaxPool2d`: input `(N, C, H, W)` or `(C, H, W)`."""

    _N: ClassVar[int] = 2


class MaxPool3d(_MaxPoolNd):
    """`torch.nn.MaxPool3d`: input `(N, C, D, H, W)` or `(C, D, H, W)`."""

    _N: ClassVar[int] = 3


class _AvgPoolNd(_PoolNd):
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] | None = None
    padding: int | Sequence[int] = 0
    ceil_mode: bool = False
    count_include_pad: bool = True

    def __post_init__(self) -> None:
        self._check_geometry()
        divisor = getattr(self, "divisor_override", None)
        if divisor is not None and divisor <= 0:
            raise RuntimeError("divisor must be not zero")
        super().__post_init__()

    def _divisor(self, spatial: Sequence[int], outs: Sequence[int]) -> np.ndarray:
        """torch's per-window divisor, separable over axes (a constant: shapes are static)."""
        override = getattr(self, "divisor_override", None)
        if override is not None:
            return np.asarray(float(override))
        per_axis = []
        for L, o, k, s, p in zip(
            spatial, outs, self._t("kernel_size"), self._t("stride"), self._t("padding")
        ):
            start = np.arange(o) * s - p
            end = np.minimum(start + k, L + p)
            if not self.count_include_pad:
                start, end = np.maximum(start, 0), np.minimum(end, L)
            per_axis.append((end - start).astype(np.float64))
        divisor = per_axis[0]
        for counts in per_axis[1:]:
            divisor = np.multiply.outer(divisor, counts)
        return divisor

    def __call__(self, input: Any) -> Array:
        x, batched = _batched(jnp.asarray(input), self._N)
        outs, pads = self._geometry(x)
        y = lax.reduce_window(
            x,
            np.array(0, x.dtype),  # concrete: the differentiable add monoid (see max)
            lax.add,
            (1, 1, *self._t("kernel_size")),
            (1, 1, *self._t("stride")),
            ((0, 0), (0, 0), *pads),
        )
        y = _crop(y, outs)
        y = y / jnp.asarray(self._divisor(x.shape[2:], outs), y.dtype)
        return y if batched else y[0]


class AvgPool1d(_AvgPoolNd):
    """`torch.nn.AvgPool1d`: input `(N, C, L)` or `(C, L)`."""

    _N: ClassVar[int] = 1


class AvgPool2d(_AvgPoolNd):
    """`torch.nn.AvgPool2d`: input `(N, C, H, W)` or `(C, H, W)`."""

    divisor_override: int | None = None

    _N: ClassVar[int] = 2


class AvgPool3d(_AvgPoolNd):
    """`torch.nn.AvgPool3d`: input `(N, C, D, H, W)` or `(C, D, H, W)`."""

    divisor_override: int | None = None

    _N: ClassVar[int] = 3


# --- adaptive pooling ------------------------------------------------------------------------


def _windows(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (out, kmax) and mask of torch's adaptive windows along one axis."""
    starts = (np.arange(out) * size) // out
    ends = -((-(np.arange(out) + 1) * size) // out)  # ceil
    kmax = int((ends - starts).max())
    index = starts[:, None] + np.arange(kmax)[None, :]
    mask = index < ends[:, None]
    return np.minimum(index, size - 1), mask


def _adaptive(x: Array, outs: Sequence[int], reduce: str) -> Array:
    for axis, out in enumerate(outs, start=2):
        size = x.shape[axis]
        if size == out:
            continue
        moved = jnp.moveaxis(x, axis, -1)
        if size % out == 0:
            grouped = moved.reshape((*moved.shape[:-1], out, size // out))
            y = grouped.mean(-1) if reduce == "avg" else grouped.max(-1)
        else:
            index, mask = _windows(size, out)
            taken = moved[..., index]
            if reduce == "avg":
                y = jnp.where(mask, taken, 0).sum(-1) / jnp.asarray(mask.sum(-1), x.dtype)
            else:
                y = jnp.where(mask, taken, -jnp.inf).max(-1).astype(x.dtype)
        x = jnp.moveaxis(y, -1, axis)
    return x


class _AdaptivePoolNd(Module):
    output_size: int | Sequence[int | None] | None

    _N: ClassVar[int] = 0
    _REDUCE: ClassVar[str] = "avg"

    def _outs(self, x: Array) -> list[int]:
        value = self.output_size
        sizes = [value] * self._N if value is None or isinstance(value, int) else list(value)
        if len(sizes) != self._N:
            raise ValueError(
                f"{type(self).__name__}: output_size must be an int, None or a sequence of "
                f"{self._N} ints / None, got {value!r}"
            )
        return [x.shape[2 + i] if s is None else int(s) for i, s in enumerate(sizes)]

    def __call__(self, input: Any) -> Array:
        x, batched = _batched(jnp.asarray(input), self._N)
        if any(d == 0 for d in x.shape[2:]):
            raise RuntimeError(f"{type(self).__name__}: input spatial size must be non-zero")
        y = _adaptive(x, self._outs(x), self._REDUCE)
        return y if batched else y[0]


class AdaptiveAvgPool1d(_AdaptivePoolNd):
    """`torch.nn.AdaptiveAvgPool1d`: average over torch's adaptive windows."""

    _N: ClassVar[int] = 1


class AdaptiveAvgPool2d(_AdaptivePoolNd):
    """`torch.nn.AdaptiveAvgPool2d`; `output_size` entries may be None (keep that size)."""

    _N: ClassVar[int] = 2


class _AdaptiveMaxPoolNd(_AdaptivePoolNd):
    return_indices: bool = False

    _REDUCE: ClassVar[str] = "max"

    def __post_init__(self) -> None:
        if self.return_indices:
            raise NotImplementedError(
                f"{type(self).__name__}(return_indices=True) is not supported by flax_registry."
            )
        super().__post_init__()


class AdaptiveMaxPool1d(_AdaptiveMaxPoolNd):
    """`torch.nn.AdaptiveMaxPool1d` (without `return_indices`)."""

    _N: ClassVar[int] = 1


class AdaptiveMaxPool2d(_AdaptiveMaxPoolNd):
    """`torch.nn.AdaptiveMaxPool2d` (without `return_indices`); max is separable over axes."""

    _N: ClassVar[int] = 2


__all__ = [
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
]
