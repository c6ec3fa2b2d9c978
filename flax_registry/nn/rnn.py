"""`LSTM` and `GRU`: torch.nn's recurrent layers, with their parameter names, layouts and gates.

Both run the time loop with `jax.lax.scan`; the input projections of all time steps (both
directions at once) are one matmul before the loop, and a bidirectional layer runs its two
directions in the same scan (the reverse direction reads the sequence back to front), so the
loop has one step per time step whatever the number of directions.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from .._linen.module import Module, is_user_constructed
from .._parameter import Parameter
from .dropout import dropout

Array = jax.Array
_HIDDEN = "Expected hidden[{}] size {{}}, got {{}}"


def _uniform(bound: float) -> Callable[[Any, tuple[int, ...], Any], Array]:
    def init(key: Any, shape: tuple[int, ...], dtype: Any) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class _RNNBase(Module):
    """Shared constructor arguments, parameters and layer loop of `LSTM` and `GRU`."""

    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False

    _MODE: ClassVar[str] = ""
    _GATES: ClassVar[int] = 1

    def __post_init__(self) -> None:
        # flax re-creates the module (a clone bound to a Scope) for every init/apply: warn
        # once, when the user constructs it, as torch's constructor does
        _check_arguments(self, warn=is_user_constructed(self))
        super().__post_init__()

    @property
    def _proj(self) -> int:
        return 0

    @property
    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _real_hidden(self) -> int:
        return self._proj or self.hidden_size

    def setup(self) -> None:
        """torch's parameters in its order: per layer, per direction `weight_ih`, `weight_hh`,
        `bias_ih`, `bias_hh` (and `weight_hr` for an LSTM with `proj_size`); every one drawn
        from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) as `RNNBase.reset_parameters`."""
        init = _uniform(1.0 / math.sqrt(self.hidden_size))
        gates = self._GATES * self.hidden_size
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else self._real_hidden * self._directions
            for suffix in self._suffixes():
                self.register_parameter(
                    f"weight_ih_l{layer}{suffix}", Parameter(init, (gates, in_size))
                )
                self.register_parameter(
                    f"weight_hh_l{layer}{suffix}", Parameter(init, (gates, self._real_hidden))
                )
                if self.bias:
                    self.register_parameter(f"bias_ih_l{layer}{suffix}", Parameter(init, (gates,)))
                    self.register_parameter(f"bias_hh_l{layer}{suffix}", Parameter(init, (gates,)))
                if self._proj:
                    self.register_parameter(
                        f"weight_hr_l{layer}{suffix}",
                        Parameter(init, (self._proj, self.hidden_size)),
                    )

    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def _stacked(self, name: str, layer: int) -> Array | None:
        """Parameter `name` of both directions of `layer`, stacked: (directions, ...)."""
        if name.startswith("bias") and not self.bias:
            return None
        return jnp.stack([self.get_parameter(f"{name}_l{layer}{s}") for s in self._suffixes()])

    # --- forward ----------------------------------------------------------------------------

    def _time_major(self, input: Any) -> tuple[Array, bool]:
        x = jnp.asarray(input)
        if x.ndim not in (2, 3):
            raise ValueError(f"{self._MODE}: Expected input to be 2D or 3D, got {x.ndim}D instead")
        batched = x.ndim == 3
        if not batched:
            x = x[:, None]
        elif self.batch_first:
            x = jnp.swapaxes(x, 0, 1)
        if x.shape[-1] != self.input_size:
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {x.shape[-1]}"
            )
        return x, batched

    def _check_hidden(
        self,
        h: Any,
        batched: bool,
        batch: int,
        size: int,
        msg: str = "Expected hidden size {}, got {}",
    ) -> Array:
        """torch's `check_hidden_size`: (layers * directions, batch, size), same message."""
        h = jnp.asarray(h)
        if not batched:
            h = h[:, None]
        expected = (self.num_layers * self._directions, batch, size)
        if h.shape != expected:
            raise RuntimeError(msg.format(expected, list(h.shape)))
        return h

    def _output(self, y: Array, batched: bool) -> Array:
        if not batched:
            return y[:, 0]
        return jnp.swapaxes(y, 0, 1) if self.batch_first else y

    def _run(self, x: Array, states: tuple[Array, ...], train: bool) -> tuple[Array, list[Array]]:
        """All layers; `states` are (layers*directions, batch, size) arrays. Returns the last
        layer's output (time, batch, directions*hidden) and the final states, same layout."""
        d = self._directions
        finals: list[list[Array]] = [[] for _ in states]
        for layer in range(self.num_layers):
            layer_states = tuple(s[layer * d : (layer + 1) * d] for s in states)
            x, last = self._layer(layer, x, layer_states)
            for acc, s in zip(finals, last):
                acc.append(s)
            if train and self.dropout > 0 and layer < self.num_layers - 1:
                x = dropout(self, x, self.dropout)
        return x, [jnp.concatenate(acc) for acc in finals]

    def _layer(
        self, layer: int, x: Array, states: tuple[Array, ...]
    ) -> tuple[Array, tuple[Array, ...]]:
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        w_ih, w_hh, b_ih, b_hh = (self._stacked(name, layer) for name in names)
        w_hr = self._stacked("weight_hr", layer) if self._proj else None
        assert w_ih is not None and w_hh is not None
        return _layer_scan(self._MODE, x, states, w_ih, w_hh, b_ih, b_hh, w_hr)


class LSTM(_RNNBase):
    """`torch.nn.LSTM`: same constructor arguments, parameters (`weight_ih_l0`, ...,
    `_reverse`, `weight_hr_l0` with `proj_size`), gate order (i, f, g, o) and initialisation.

    `__call__(input, hx=None, *, train=False)` returns `(output, (h_n, c_n))` exactly as torch,
    for batched (`batch_first` or not) and unbatched input; `h_n`/`c_n` are
    (num_layers * directions, batch, size) whatever `batch_first` is, as in torch.

    Differences from torch: `train=True` is `model.train()` (dropout between layers draws from
    the 'dropout' rng stream); `PackedSequence` input is not supported (mask or pad instead);
    the input is not checked against the weights' dtype (JAX promotes instead).
    """

    proj_size: int = 0

    _MODE: ClassVar[str] = "LSTM"
    _GATES: ClassVar[int] = 4

    @property
    def _proj(self) -> int:
        return self.proj_size

    def __call__(
        self, input: Any, hx: tuple[Any, Any] | None = None, *, train: bool = False
    ) -> tuple[Array, tuple[Array, Array]]:
        x, batched = self._time_major(input)
        rows = self.num_layers * self._directions
        if hx is None:
            h0 = jnp.zeros((rows, x.shape[1], self._real_hidden), x.dtype)
            c0 = jnp.zeros((rows, x.shape[1], self.hidden_size), x.dtype)
        else:
            h, c = hx
            dims = (jnp.ndim(h), jnp.ndim(c))
            want = 3 if batched else 2
            if dims != (want, want):
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {want}-D but got "
                    f"({dims[0]}-D, {dims[1]}-D) tensors"
                )
            n = x.shape[1]
            h0 = self._check_hidden(h, batched, n, self._real_hidden, _HIDDEN.format(0))
            c0 = self._check_hidden(c, batched, n, self.hidden_size, _HIDDEN.format(1))
        y, (h_n, c_n) = self._run(x, (h0, c0), train)
        if not batched:
            h_n, c_n = h_n[:, 0], c_n[:, 0]
        return self._output(y, batched), (h_n, c_n)


class GRU(_RNNBase):
    """`torch.nn.GRU`: same constructor arguments, parameters, gate order (r, z, n) and
    initialisation; the new gate is torch's `n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`.

    `__call__(input, hx=None, *, train=False)` returns `(output, h_n)` exactly as torch.
    Differences from torch: as for `LSTM` (train flag, no `PackedSequence`, no dtype check).
    """

    _MODE: ClassVar[str] = "GRU"
    _GATES: ClassVar[int] = 3

    def __call__(
        self, input: Any, hx: Any | None = None, *, train: bool = False
    ) -> tuple[Array, Array]:
        x, batched = self._time_major(input)
        rows = self.num_layers * self._directions
        if hx is None:
            h0 = jnp.zeros((rows, x.shape[1], self.hidden_size), x.dtype)
        else:
            want = 3 if batched else 2
            if jnp.ndim(hx) != want:
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RuntimeError(
                    f"For {kind} input, hx should also be {want}-D but got {jnp.ndim(hx)}-D tensor"
                )
            h0 = self._check_hidden(hx, batched, x.shape[1], self.hidden_size)
        y, (h_n,) = self._run(x, (h0,), train)
        return self._output(y, batched), (h_n if batched else h_n[:, 0])


@functools.partial(jax.jit, static_argnames=("mode",))
def _layer_scan(
    mode: str,
    x: Array,
    states: tuple[Array, ...],
    w_ih: Array,
    w_hh: Array,
    b_ih: Array | None,
    b_hh: Array | None,
    w_hr: Array | None,
) -> tuple[Array, tuple[Array, ...]]:
    """One layer, all directions (weights stacked on a leading direction axis).

    `x` is (time, batch, features), `states` (directions, batch, size) arrays. Returns the
    output (time, batch, directions * hidden) and the final states. Jitted on its own so
    that eager calls reuse the compiled scan (nested in an outer `jax.jit` it is inlined).
    """
    directions = w_ih.shape[0]
    proj = jnp.einsum("tni,dgi->dtng", x, w_ih)  # every step, every direction: one matmul
    if b_ih is not None and b_hh is not None:
        # LSTM: both biases sit outside the gates; GRU: b_hn stays inside r * (...)
        proj = proj + (b_ih + b_hh if mode == "LSTM" else b_ih)[:, None, None, :]
        b_hh = None if mode == "LSTM" else b_hh
    if directions == 2:  # the reverse direction reads the sequence back to front
        proj = jnp.stack([proj[0], proj[1, ::-1]])
    dtype = jnp.result_type(proj, w_hh)
    cell = _lstm_cell if mode == "LSTM" else _gru_cell

    def step(carry: tuple[Array, ...], xt: Array) -> tuple[tuple[Array, ...], Array]:
        new = cell(xt, carry, w_hh, b_hh, w_hr)
        return new, new[0]

    carry = tuple(s.astype(dtype) for s in states)
    last, ys = jax.lax.scan(step, carry, jnp.swapaxes(proj, 0, 1))  # ys: (t, d, n, h)
    if directions == 2:
        ys = jnp.stack([ys[:, 0], ys[::-1, 1]], axis=1)
    t, d, n, h = ys.shape
    return jnp.swapaxes(ys, 1, 2).reshape(t, n, d * h), last


def _hidden_matmul(h: Array, w_hh: Array, b_hh: Array | None) -> Array:
    gh = jnp.einsum("dnh,dgh->dng", h, w_hh)
    return gh if b_hh is None else gh + b_hh[:, None, :]


def _lstm_cell(
    xt: Array, carry: tuple[Array, ...], w_hh: Array, b_hh: Array | None, w_hr: Array | None
) -> tuple[Array, ...]:
    """torch's LSTM step, gates (i, f, g, o); `xt` holds W_ih x + b_ih + b_hh."""
    h, c = carry
    i, f, g, o = jnp.split(xt + _hidden_matmul(h, w_hh, b_hh), 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    if w_hr is not None:
        h = jnp.einsum("dnh,dph->dnp", h, w_hr)
    return h, c


def _gru_cell(
    xt: Array, carry: tuple[Array, ...], w_hh: Array, b_hh: Array | None, w_hr: Array | None
) -> tuple[Array, ...]:
    """torch's GRU step, gates (r, z, n): n = tanh(W_in x + b_in + r * (W_hn h + b_hn))."""
    (h,) = carry
    xr, xz, xn = jnp.split(xt, 3, axis=-1)
    hr, hz, hn = jnp.split(_hidden_matmul(h, w_hh, b_hh), 3, axis=-1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    return ((1.0 - z) * n + z * h,)


def _check_arguments(m: _RNNBase, warn: bool) -> None:
    """torch's constructor checks (RNNBase.__init__), with its messages."""
    dropout = m.dropout
    if (
        not isinstance(dropout, numbers.Number)
        or isinstance(dropout, bool)
        or not 0 <= dropout <= 1  # type: ignore[operator]
    ):
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an "
            "element being zeroed"
        )
    if warn and dropout > 0 and m.num_layers == 1:  # type: ignore[operator]
        warnings.warn(
            "dropout option adds dropout after all but last recurrent layer, so non-zero "
            f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
            f"num_layers={m.num_layers}",
            stacklevel=5,
        )
    for name in ("bias", "batch_first"):
        if not isinstance(getattr(m, name), bool):
            raise TypeError(
                f"{name} should be of type bool, got: {type(getattr(m, name)).__name__}"
            )
    for name in ("input_size", "hidden_size"):
        value = getattr(m, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be greater than zero")
    if m.num_layers <= 0:
        raise ValueError("num_layers must be greater than zero")
    proj = m._proj
    if proj < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections")
    if proj >= m.hidden_size:
        raise ValueError("proj_size has to be smaller than hidden_size")
