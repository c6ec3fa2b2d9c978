"""`Conv1d/2d/3d` and `ConvTranspose1d/2d/3d`: torch.nn's convolutions on torch layout.

One N-d implementation each. Inputs are channels-first (`(N, C, *spatial)`, or unbatched
`(C, *spatial)`), weights keep torch's layout — Conv `(out, in / groups, *kernel)`,
ConvTranspose `(in, out / groups, *kernel)` — and `jax.lax.conv_general_dilated` reads them
in place through its dimension numbers (`'NCH..'`, `'OIH..'` / `'IOH..'`, `'NCH..'`), so no
layout transpose runs at call time. A transposed convolution is the direct convolution of the
input dilated by `stride` (`lhs_dilation`) with the spatially flipped kernel, padded by
`dilation * (kernel - 1) - padding` on each side plus `output_padding` at the end, which is
torch's definition (the gradient of Conv w.r.t. its input). With `groups > 1` its kernel is
regrouped to `(in / groups, out, *kernel)` (a reshape of the weight, as XLA's own gradient
of a grouped convolution does).

Differences from torch: no `device` argument; `dtype` is the parameter dtype (float32 when
None); `precision` (not in torch) goes to `conv_general_dilated` (on GPU/TPU JAX's default
may use reduced precision, as torch's `allow_tf32` does); constructor arguments are checked
when the module is built, including checks torch only makes in the forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from .._linen.module import Module
from .._messages import torch_size
from .._parameter import Parameter
from . import _init

Array = jax.Array

_PADDING_MODES = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "edge",
    "circular": "wrap",
}
_SPATIAL = {1: "H", 2: "HW", 3: "DHW"}


def _tuple(value: Any, n: int, what: str, cls: str) -> tuple[int, ...]:
    """torch's `_single/_pair/_triple`, with an error for a sequence of the wrong length."""
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == n:
        return tuple(int(v) for v in value)
    raise ValueError(f"{cls}: {what} must be an int or a sequence of {n} ints, got {value!r}")


def _dimension_numbers(n: int, kernel: str) -> tuple[str, str, str]:
    spatial = _SPATIAL[n]
    return "NC" + spatial, kernel + spatial, "NC" + spatial


def _batched(module: Module, x: Array, n: int) -> tuple[Array, bool]:
    """The input with a batch axis, and whether it had one (torch accepts unbatched input)."""
    if x.ndim not in (n + 1, n + 2):
        raise RuntimeError(
            f"Expected {n + 1}D (unbatched) or {n + 2}D (batched) input to "
            f"{type(module).__name__.lower().replace('transpose', '_transpose')}, but got input "
            f"of size: {torch_size(x.shape)}"
        )
    return (x, True) if x.ndim == n + 2 else (x[None], False)


def _check_channels(module: Any, x: Array, weight: Array, transposed: bool) -> None:
    channels = module.in_channels
    if x.shape[1] != channels:
        kind = "transposed=1" if transposed else f"groups={module.groups}"
        raise RuntimeError(
            f"Given {kind}, weight of size {torch_size(weight.shape)}, expected input"
            f"{torch_size(x.shape)} to have {channels} channels, but got {x.shape[1]} channels "
            f"instead ({type(module).__name__})"
        )


def _check_common(module: Any, n: int) -> None:
    """torch's `_ConvNd.__init__` checks, with its messages."""
    cls = type(module).__name__
    if module.groups <= 0:
        raise ValueError("groups must be a positive integer")
    if module.in_channels % module.groups != 0:
        raise ValueError("in_channels must be divisible by groups")
    if module.out_channels % module.groups != 0:
        raise ValueError("out_channels must be divisible by groups")
    if module.padding_mode not in _PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {set(_PADDING_MODES)}, but got "
            f"padding_mode='{module.padding_mode}'"
        )
    for what in ("kernel_size", "stride", "dilation"):
        values = _tuple(getattr(module, what), n, what, cls)
        if any(v <= 0 for v in values):
            raise ValueError(f"{cls}: {what} must be positive, got {getattr(module, what)!r}")


def _register_weight_and_bias(module: Any, weight_shape: tuple[int, ...]) -> None:
    """torch's `_ConvNd.reset_parameters`: kaiming-uniform weight, uniform bias (or None)."""
    weight = Parameter(_init.default_weight(), weight_shape, module.dtype)
    bias = Parameter(_init.default_bias(weight_shape), (module.out_channels,), module.dtype)
    module.register_parameter("weight", weight)
    module.register_parameter("bias", bias if module.bias else None)


def _add_bias(module: Any, y: Array, n: int) -> Array:
    if module.bias:
        y = y + module.get_parameter("bias").reshape((-1,) + (1,) * n)
    return y


class _ConvNd(Module):
    """Shared implementation of `Conv1d/2d/3d` (torch's `_ConvNd` with `transposed=False`)."""

    in_channels: int
    out_channels: int
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] = 1
    padding: str | int | Sequence[int] = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    dtype: Any = None
    precision: Any = None

    _N: ClassVar[int] = 0

    def __post_init__(self) -> None:
        _check_common(self, self._N)
        if isinstance(self.padding, str):
            if self.padding not in ("same", "valid"):
                raise ValueError(
                    f"Invalid padding string {self.padding!r}, should be one of {{'same', 'valid'}}"
                )
            if self.padding == "same" and any(s != 1 for s in self._t("stride")):
                raise ValueError("padding='same' is not supported for strided convolutions")
        elif any(p < 0 for p in self._t("padding")):
            raise ValueError(f"{type(self).__name__}: negative padding is not supported")
        super().__post_init__()

    def _t(self, what: str) -> tuple[int, ...]:
        return _tuple(getattr(self, what), self._N, what, type(self).__name__)

    def setup(self) -> None:
        shape = (self.out_channels, self.in_channels // self.groups, *self._t("kernel_size"))
        _register_weight_and_bias(self, shape)

    def _pads(self) -> list[tuple[int, int]]:
        """(low, high) padding per spatial axis, as torch computes it ('same' may be uneven:
        the extra element goes at the end)."""
        if self.padding == "valid":
            return [(0, 0)] * self._N
        if self.padding == "same":
            pads = []
            for d, k in zip(self._t("dilation"), self._t("kernel_size")):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            return pads
        return [(p, p) for p in self._t("padding")]

    def __call__(self, input: Any) -> Array:
        n = self._N
        x, batched = _batched(self, jnp.asarray(input), n)
        weight = self.weight
        _check_channels(self, x, weight, transposed=False)
        pads = self._pads()
        if self.padding_mode != "zeros":
            _check_pad_mode(self, x, pads)
            widths = [(0, 0), (0, 0), *pads]
            x = jnp.pad(x, widths, mode=_PADDING_MODES[self.padding_mode])  # type: ignore[call-overload]
            pads = [(0, 0)] * n
        _check_kernel_fits(self, x, pads)
        y = lax.conv_general_dilated(
            x,
            weight,
            window_strides=self._t("stride"),
            padding=pads,
            rhs_dilation=self._t("dilation"),
            dimension_numbers=_dimension_numbers(n, "OI"),
            feature_group_count=self.groups,
            precision=self.precision,
        )
        y = _add_bias(self, y, n)
        return y if batched else y[0]


def _check_pad_mode(module: _ConvNd, x: Array, pads: list[tuple[int, int]]) -> None:
    """torch's F.pad limits for reflect (pad < size) and circular (pad <= size)."""
    for axis, (lo, hi) in reversed(list(enumerate(pads, start=2))):  # torch checks the last first
        size = x.shape[axis]
        if module.padding_mode == "reflect" and max(lo, hi) >= size:
            raise RuntimeError(
                f"Argument #4: Padding size should be less than the corresponding input "
                f"dimension, but got: padding ({lo}, {hi}) at dimension {axis} of input "
                f"{torch_size(x.shape)} ({type(module).__name__} with padding_mode='reflect')"
            )
        if module.padding_mode == "circular" and max(lo, hi) > size:
            raise RuntimeError(
                "Padding value causes wrapping around more than once. "
                f"({type(module).__name__}: padding ({lo}, {hi}) at dimension {axis} of input "
                f"{torch_size(x.shape)} with padding_mode='circular')"
            )


def _check_kernel_fits(module: _ConvNd, x: Array, pads: list[tuple[int, int]]) -> None:
    padded = [x.shape[2 + i] + lo + hi for i, (lo, hi) in enumerate(pads)]
    dilation = module._t("dilation")
    kernel = [d * (k - 1) + 1 for d, k in zip(dilation, module._t("kernel_size"))]
    if any(p < k for p, k in zip(padded, kernel)):
        raise RuntimeError(
            f"Calculated padded input size per channel: ({' x '.join(map(str, padded))}). "
            f"Kernel size: ({' x '.join(map(str, kernel))}). Kernel size can't be greater "
            f"than actual input size ({type(module).__name__})"
        )


class Conv1d(_ConvNd):
    """`torch.nn.Conv1d`: input `(N, C_in, L)` or `(C_in, L)`, weight `(out, in/groups, k)`."""

    _N: ClassVar[int] = 1


class Conv2d(_ConvNd):
    """`torch.nn.Conv2d`: input `(N, C_in, H, W)` or `(C_in, H, W)`, weight
    `(out, in/groups, kH, kW)`."""

    _N: ClassVar[int] = 2


class Conv3d(_ConvNd):
    """`torch.nn.Conv3d`: input `(N, C_in, D, H, W)` or unbatched, weight
    `(out, in/groups, kD, kH, kW)`."""

    _N: ClassVar[int] = 3


class _ConvTransposeNd(Module):
    """Shared implementation of `ConvTranspose1d/2d/3d` (torch's `_ConvTransposeNd`).

    `__call__(input, output_size=None)`: as torch, `output_size` picks the output padding
    among the sizes the stride makes ambiguous.
    """

    in_channels: int
    out_channels: int
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] = 1
    padding: int | Sequence[int] = 0
    output_padding: int | Sequence[int] = 0
    groups: int = 1
    bias: bool = True
    dilation: int | Sequence[int] = 1
    padding_mode: str = "zeros"
    dtype: Any = None
    precision: Any = None

    _N: ClassVar[int] = 0

    def __post_init__(self) -> None:
        _check_common(self, self._N)
        cls = type(self).__name__
        if self.padding_mode != "zeros":
            raise ValueError(f'Only "zeros" padding mode is supported for {cls}')
        if isinstance(self.padding, str):
            raise ValueError(f"{cls} does not support string padding, got {self.padding!r}")
        if any(p < 0 for p in self._t("padding")):
            raise ValueError(f"{cls}: negative padding is not supported")
        _check_output_padding(self, self._t("output_padding"))
        super().__post_init__()

    def _t(self, what: str) -> tuple[int, ...]:
        return _tuple(getattr(self, what), self._N, what, type(self).__name__)

    def setup(self) -> None:
        shape = (self.in_channels, self.out_channels // self.groups, *self._t("kernel_size"))
        _register_weight_and_bias(self, shape)

    def _output_padding(self, x: Array, batched: bool, output_size: Any) -> tuple[int, ...]:
        """torch's `_ConvTransposeNd._output_padding`, with its messages."""
        n = self._N
        if output_size is None:
            return self._t("output_padding")
        size = [int(s) for s in output_size]
        non_spatial = 2 if batched else 1
        if len(size) == non_spatial + n:
            size = size[non_spatial:]
        if len(size) != n:
            raise ValueError(
                f"ConvTranspose{n}D: for {x.ndim - (0 if batched else 1)}D input, output_size "
                f"must have {n} or {non_spatial + n} elements (got {len(output_size)})"
            )
        stride, padding = self._t("stride"), self._t("padding")
        dilation, kernel = self._t("dilation"), self._t("kernel_size")
        spatial = x.shape[2:]
        min_sizes = [
            (spatial[d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (kernel[d] - 1) + 1
            for d in range(n)
        ]
        max_sizes = [lo + s - 1 for lo, s in zip(min_sizes, stride)]
        if any(not lo <= s <= hi for s, lo, hi in zip(size, min_sizes, max_sizes)):
            raise ValueError(
                f"requested an output size of {tuple(output_size)}, but valid sizes range from "
                f"{min_sizes} to {max_sizes} (for an input of {tuple(spatial)})"
            )
        return tuple(s - lo for s, lo in zip(size, min_sizes))

    def _kernel(self) -> tuple[Array, str]:
        """The weight flipped spatially, as an 'IO' kernel with I = in / groups."""
        n, g = self._N, self.groups
        weight = lax.rev(self.weight, tuple(range(2, 2 + n)))
        if g == 1:
            return weight, "IO"
        in_g, out_g, kernel = self.in_channels // g, self.out_channels // g, weight.shape[2:]
        weight = weight.reshape((g, in_g, out_g, *kernel)).swapaxes(0, 1)
        return weight.reshape((in_g, g * out_g, *kernel)), "IO"

    def __call__(self, input: Any, output_size: Sequence[int] | None = None) -> Array:
        n = self._N
        x, batched = _batched(self, jnp.asarray(input), n)
        _check_channels(self, x, self.weight, transposed=True)
        output_padding = self._output_padding(x, batched, output_size)
        kernel, layout = self._kernel()
        pads = [
            (d * (k - 1) - p, d * (k - 1) - p + op)
            for d, k, p, op in zip(
                self._t("dilation"), self._t("kernel_size"), self._t("padding"), output_padding
            )
        ]
        y = lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(1,) * n,
            padding=pads,
            lhs_dilation=self._t("stride"),
            rhs_dilation=self._t("dilation"),
            dimension_numbers=_dimension_numbers(n, layout),
            feature_group_count=self.groups,
            precision=self.precision,
        )
        if any(d <= 0 for d in y.shape[2:]):
            raise RuntimeError(
                f"{type(self).__name__}: the output size {tuple(y.shape[2:])} is too small for "
                f"an input of {tuple(x.shape[2:])}; reduce padding or increase the input size."
            )
        y = _add_bias(self, y, n)
        return y if batched else y[0]


def _check_output_padding(module: _ConvTransposeNd, output_padding: tuple[int, ...]) -> None:
    stride, dilation = module._t("stride"), module._t("dilation")
    if all(op < s or op < d for op, s, d in zip(output_padding, stride, dilation)):
        return
    axes = ("depth", "height", "width")[3 - module._N :]
    parts = [f"output_padding_{a}: {v}" for a, v in zip(axes, output_padding)]
    parts += [f"stride_{a}: {v}" for a, v in zip(axes, stride)]
    parts += [f"dilation_{a}: {v}" for a, v in zip(axes, dilation)]
    raise RuntimeError(
        "output padding must be smaller than either stride or dilation, but got " + " ".join(parts)
    )


class ConvTranspose1d(_ConvTransposeNd):
    """`torch.nn.ConvTranspose1d`: weight `(in, out/groups, k)`."""

    _N: ClassVar[int] = 1


class ConvTranspose2d(_ConvTransposeNd):
    """`torch.nn.ConvTranspose2d`: weight `(in, out/groups, kH, kW)`."""

    _N: ClassVar[int] = 2


class ConvTranspose3d(_ConvTransposeNd):
    """`torch.nn.ConvTranspose3d`: weight `(in, out/groups, kD, kH, kW)`."""

    _N: ClassVar[int] = 3
