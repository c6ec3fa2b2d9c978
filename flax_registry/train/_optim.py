"""`torch_sgd`, `torch_adam`, `torch_adamw`: optax transformations that follow PyTorch's
`torch.optim.SGD`, `Adam` and `AdamW` update rules operation for operation.

Why not `optax.sgd` / `optax.adamw`? They agree with PyTorch only for some settings:

- SGD weight decay: PyTorch adds `weight_decay * param` to the gradient *before* momentum;
  `optax.sgd` has no weight decay, and `optax.chain(optax.add_decayed_weights(wd),
  optax.sgd(lr, momentum))` is the right order (it is what `torch_sgd` computes).
- SGD dampening: PyTorch's momentum buffer starts as the first gradient, undamped, and later
  steps add `(1 - dampening) * grad`; `optax.trace` has no dampening. With `dampening=0`
  the two agree (the zero-initialised trace gives the first gradient too).
- AdamW's default `weight_decay` is 1e-2 in PyTorch and 1e-4 in `optax.adamw`; both decay by
  `lr * weight_decay * param`, PyTorch before the Adam step, optax inside the update.
- Adam's epsilon: both add `eps` outside the square root, after bias correction
  (`sqrt(v) / sqrt(1 - beta2**t) + eps` in PyTorch, `sqrt(v / (1 - beta2**t)) + eps` in
  optax: equal up to rounding). PyTorch's `amsgrad` keeps the maximum of the raw second
  moment, optax's `amsgrad` the maximum of the bias-corrected one: they differ.
- PyTorch's `Adam(weight_decay=...)` is L2 regularisation (added to the gradient), not
  decoupled decay; `torch_adam` does the same.

The bias corrections `1 - beta**t` are computed as `-expm1(t * log(beta))`: PyTorch computes
them in float64 on the host, and the naive float32 power loses about 1e-5 relative precision
for `beta2 = 0.999`.

Each factory returns a `TorchOptimizer`: an ordinary optax `GradientTransformation` that also
records the `torch.optim` class it follows and its hyper-parameters under PyTorch's
`param_groups` names, so that a training run can move to and from PyTorch with its optimizer
state (`flax_registry.train.from_torch_checkpoint`). `lr` may be an optax schedule, and so may
SGD's `momentum` and Adam's `beta1` (PyTorch's `OneCycleLR(cycle_momentum=True)` changes them
every step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule: TypeAlias = float | optax.Schedule

_NO_PARAMS = (
    "weight decay needs the current parameters: call tx.update(grads, opt_state, params) "
    "(TrainState.apply_gradients does)."
)


class TorchSGDState(NamedTuple):
    """`step`: steps taken; `momentum_buffer`: PyTorch's per-parameter buffer (an
    `optax.EmptyState` when `momentum=0`, as PyTorch keeps none then)."""

    step: jax.Array
    momentum_buffer: Any


class TorchAdamState(NamedTuple):
    """PyTorch's per-parameter `step`, `exp_avg`, `exp_avg_sq` and (only with `amsgrad`, else
    an `optax.EmptyState`) `max_exp_avg_sq`; `step` is shared by all parameters."""

    step: jax.Array
    exp_avg: Any
    exp_avg_sq: Any
    max_exp_avg_sq: Any


class TorchOptimizer(optax.GradientTransformation):
    """An optax `GradientTransformation` that knows which `torch.optim` optimizer it is.

    `torch_class` is `"SGD"`, `"Adam"` or `"AdamW"`; `hyperparams` holds the arguments under
    the names of PyTorch's `param_groups` (`lr`, `momentum`, `betas`, ...; a schedule where one
    was given). optax sees a plain `(init, update)` pair: the two extra attributes are read
    only when optimizer state is converted to or from PyTorch's `optimizer.state_dict()`.
    """

    torch_class: str
    hyperparams: Mapping[str, Any]

    def __new__(
        cls,
        init: Any,
        update: Any,
        torch_class: str = "",
        hyperparams: Mapping[str, Any] | None = None,
    ) -> TorchOptimizer:
        self = super().__new__(cls, init, update)
        self.torch_class = torch_class
        self.hyperparams = dict(hyperparams or {})
        return self


def _value(x: ScalarOrSchedule, count: jax.Array) -> Any:
    return x(count) if callable(x) else x


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _learning_rate(lr: ScalarOrSchedule, count: jax.Array) -> Any:
    return lr(count) if callable(lr) else lr


def _check_lr(lr: ScalarOrSchedule) -> None:
    if not callable(lr):
        _check(lr >= 0.0, f"Invalid learning rate: {lr}")


def _bias_correction(beta: Any, step: jax.Array) -> jax.Array:
    """`1 - beta**step`, accurate in float32 (PyTorch computes it in float64); `beta` may be
    a traced value (a scheduled beta1)."""
    if isinstance(beta, int | float):
        if beta == 0.0:
            return jnp.ones((), jnp.float32)
        return -jnp.expm1(step.astype(jnp.float32) * math.log(beta))
    beta = jnp.asarray(beta, jnp.float32)
    return jnp.where(beta == 0.0, 1.0, -jnp.expm1(step.astype(jnp.float32) * jnp.log(beta)))


def torch_sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: ScalarOrSchedule = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
) -> TorchOptimizer:
    """`torch.optim.SGD` as an optax transformation, with PyTorch's arguments and defaults.

    Per parameter, as PyTorch: `g = grad + weight_decay * param`; with momentum,
    `buf = g` on the first step and `buf = momentum * buf + (1 - dampening) * g` after;
    `g = g + momentum * buf` (nesterov) or `g = buf`; update `-lr * g`.

    .. warning::
       `optax.sgd(lr, momentum)` has no weight decay and no dampening; chaining
       `optax.add_decayed_weights` *after* it decays the momentum-free update instead of the
       gradient, which is not PyTorch's SGD. `lr` may be an optax schedule (called with the
       number of steps taken), the counterpart of a PyTorch LR scheduler stepped every step;
       so may `momentum` (`OneCycleLR`'s cycled momentum).
    """
    _check_lr(lr)
    has_momentum = callable(momentum) or momentum != 0
    if not callable(momentum):
        _check(momentum >= 0.0, f"Invalid momentum value: {momentum}")
    _check(weight_decay >= 0.0, f"Invalid weight_decay value: {weight_decay}")
    _check(
        not nesterov or (has_momentum and dampening == 0),
        "Nesterov momentum requires a momentum and zero dampening",
    )

    def init(params: Any) -> TorchSGDState:
        buf = jax.tree.map(jnp.zeros_like, params) if has_momentum else optax.EmptyState()
        return TorchSGDState(jnp.zeros((), jnp.int32), buf)

    def update(updates: Any, state: TorchSGDState, params: Any = None) -> Any:
        if weight_decay != 0 and params is None:
            raise ValueError(_NO_PARAMS)
        first = state.step == 0
        lr_t = _learning_rate(lr, state.step)
        momentum_t = _value(momentum, state.step)
        treedef: Any = jax.tree.structure(updates)
        grads = treedef.flatten_up_to(updates)
        ps = treedef.flatten_up_to(params) if params is not None else [None] * len(grads)
        bufs = treedef.flatten_up_to(state.momentum_buffer) if has_momentum else []
        new_u, new_bufs = [], []
        for i, (g, p) in enumerate(zip(grads, ps)):
            if maximize:
                g = -g
            if weight_decay != 0:
                g = g + weight_decay * p
            if has_momentum:
                buf = jnp.where(first, g, bufs[i] * momentum_t + (1 - dampening) * g)
                new_bufs.append(buf.astype(g.dtype))
                g = g + momentum_t * buf if nesterov else buf
            new_u.append((-lr_t * g).astype(g.dtype))
        new_updates = treedef.unflatten(new_u)
        new_buf = treedef.unflatten(new_bufs) if has_momentum else optax.EmptyState()
        return new_updates, TorchSGDState(optax.safe_increment(state.step), new_buf)

    hyperparams = dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
    )
    return TorchOptimizer(init, update, "SGD", hyperparams)


def _torch_adam(
    lr: ScalarOrSchedule,
    betas: tuple[ScalarOrSchedule, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
) -> TorchOptimizer:
    _check_lr(lr)
    _check(eps >= 0.0, f"Invalid epsilon value: {eps}")
    if not callable(betas[0]):
        _check(0.0 <= betas[0] < 1.0, f"Invalid beta parameter at index 0: {betas[0]}")
    _check(0.0 <= betas[1] < 1.0, f"Invalid beta parameter at index 1: {betas[1]}")
    _check(weight_decay >= 0.0, f"Invalid weight_decay value: {weight_decay}")
    beta1, beta2 = betas

    def init(params: Any) -> TorchAdamState:
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return TorchAdamState(
            jnp.zeros((), jnp.int32), zeros(), zeros(), zeros() if amsgrad else optax.EmptyState()
        )

    def update(updates: Any, state: TorchAdamState, params: Any = None) -> Any:
        if weight_decay != 0 and params is None:
            raise ValueError(_NO_PARAMS)
        lr_t = _learning_rate(lr, state.step)
        beta1_t = _value(beta1, state.step)
        step = optax.safe_increment(state.step)
        bias1 = _bias_correction(beta1_t, step)
        bias2_sqrt = jnp.sqrt(_bias_correction(beta2, step))
        step_size = lr_t / bias1
        treedef: Any = jax.tree.structure(updates)
        grads = treedef.flatten_up_to(updates)
        ps = treedef.flatten_up_to(params) if params is not None else [None] * len(grads)
        ms = treedef.flatten_up_to(state.exp_avg)
        vs = treedef.flatten_up_to(state.exp_avg_sq)
        vmaxs = treedef.flatten_up_to(state.max_exp_avg_sq) if amsgrad else [None] * len(grads)
        new_u, new_m, new_v, new_vmax = [], [], [], []
        for g, p, m, v, vmax in zip(grads, ps, ms, vs, vmaxs):
            if maximize:
                g = -g
            if weight_decay != 0 and not decoupled:
                g = g + weight_decay * p
            m = (m + (1 - beta1_t) * (g - m)).astype(m.dtype)  # torch: exp_avg.lerp_(grad, 1 - b1)
            v = v * beta2 + (1 - beta2) * (g * g)
            if amsgrad:
                vmax = jnp.maximum(vmax, v)
                denom = jnp.sqrt(vmax) / bias2_sqrt + eps
            else:
                denom = jnp.sqrt(v) / bias2_sqrt + eps
            u = -step_size * (m / denom)
            if weight_decay != 0 and decoupled:  # torch: param.mul_(1 - lr * weight_decay)
                u = u - (lr_t * weight_decay) * p
            new_u.append(u.astype(g.dtype))
            new_m.append(m)
            new_v.append(v)
            new_vmax.append(vmax)
        new_state = TorchAdamState(
            step,
            treedef.unflatten(new_m),
            treedef.unflatten(new_v),
            treedef.unflatten(new_vmax) if amsgrad else optax.EmptyState(),
        )
        return treedef.unflatten(new_u), new_state

    hyperparams = dict(
        lr=lr,
        betas=(beta1, beta2),
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=decoupled,
    )
    return TorchOptimizer(init, update, "AdamW" if decoupled else "Adam", hyperparams)


def torch_adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ScalarOrSchedule, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> TorchOptimizer:
    """`torch.optim.Adam` as an optax transformation, with PyTorch's arguments and defaults.

    .. warning::
       PyTorch's Adam `weight_decay` is L2 regularisation: `weight_decay * param` is added to
       the gradient before the moments, unlike `optax.adamw` (decoupled, see `torch_adamw`).
       `amsgrad` keeps the maximum of the raw second moment, as PyTorch does, not of the
       bias-corrected one as `optax.amsgrad` does.
    """
    return _torch_adam(lr, betas, eps, weight_decay, amsgrad, maximize, decoupled=False)


def torch_adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ScalarOrSchedule, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> TorchOptimizer:
    """`torch.optim.AdamW` as an optax transformation, with PyTorch's arguments and defaults.

    Per parameter, as PyTorch: `param *= 1 - lr * weight_decay`; `m = lerp(m, g, 1 - beta1)`;
    `v = beta2 * v + (1 - beta2) * g * g`; `param -= lr / (1 - beta1**t) * m /
    (sqrt(v) / sqrt(1 - beta2**t) + eps)`.

    .. warning::
       The default `weight_decay` is PyTorch's 1e-2, not `optax.adamw`'s 1e-4, and it decays
       every parameter this transformation sees: to exempt biases and norm weights, as
       PyTorch users do with a second param group, give them a `ParamGroup` with
       `torch_adamw(..., weight_decay=0.0)`. Decay never reaches buffers, which no optimizer
       sees.
    """
    return _torch_adam(lr, betas, eps, weight_decay, amsgrad, maximize, decoupled=True)
