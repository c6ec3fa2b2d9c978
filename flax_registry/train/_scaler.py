"""`GradScaler`: dynamic loss scaling for float16 training, `torch.amp.GradScaler`'s rule.

float16 has five exponent bits: small gradients underflow to zero unless the loss is first
multiplied by a large scale. The scale is then divided out of the gradients, and a step whose
gradients hold an inf or a NaN (the scaled backward pass overflowed) is skipped: parameters,
optimizer state and step count stay as they were, and the scale is multiplied by
`backoff_factor`. After `growth_interval` steps in a row without overflow it is multiplied by
`growth_factor`. A `GradScaler` lives in `TrainState.loss_scale`
(`create_train_state(..., loss_scale=GradScaler.create())`), and `make_train_step` then
scales, unscales and skips by itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class GradScaler:
    """The loss scale and its growth tracker (a pytree), with PyTorch's constants (static).

    The counterpart of `torch.amp.GradScaler(init_scale, growth_factor, backoff_factor,
    growth_interval)`: `scale_loss` is `scaler.scale(loss)`, `unscale` is `scaler.unscale_`
    (returning `found_inf` instead of recording it), `update` is `scaler.update()`, and
    `state_dict()` has PyTorch's keys. Differences: it is a value, not an object with state;
    the skip is done by the train step (`skip_if_overflow`), not by wrapping
    `optimizer.step`; no `enabled=False` (leave `loss_scale` None instead).
    """

    scale: jax.Array
    growth_tracker: jax.Array
    growth_factor: float = struct.field(pytree_node=False, default=2.0)
    backoff_factor: float = struct.field(pytree_node=False, default=0.5)
    growth_interval: int = struct.field(pytree_node=False, default=2000)

    def replace(self, **updates: Any) -> GradScaler:
        """A copy with some fields replaced (as `dataclasses.replace`)."""
        return dataclasses.replace(self, **updates)

    @classmethod
    def create(
        cls,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> GradScaler:
        """A scaler at its initial scale, with `torch.amp.GradScaler`'s defaults."""
        if growth_factor <= 1.0 or not 0.0 < backoff_factor < 1.0 or growth_interval < 1:
            raise ValueError(
                "GradScaler needs growth_factor > 1, 0 < backoff_factor < 1 and "
                f"growth_interval >= 1 (as torch.amp.GradScaler), got {growth_factor}, "
                f"{backoff_factor}, {growth_interval}"
            )
        return cls(
            scale=jnp.asarray(init_scale, jnp.float32),
            growth_tracker=jnp.zeros((), jnp.int32),
            growth_factor=float(growth_factor),
            backoff_factor=float(backoff_factor),
            growth_interval=int(growth_interval),
        )

    def scale_loss(self, loss: jax.Array) -> jax.Array:
        """`loss * scale`, in float32 at least (the backward pass starts from it)."""
        dtype = jnp.promote_types(jnp.result_type(loss), jnp.float32)
        return jnp.asarray(loss, dtype) * self.scale.astype(dtype)

    def unscale(self, grads: Any) -> tuple[Any, jax.Array]:
        """`(grads / scale, found_inf)`: each gradient times `1 / scale` (float32, as
        PyTorch's `inv_scale`), and whether any of them holds an inf or a NaN."""
        inv = jnp.reciprocal(self.scale)
        unscaled = jax.tree.map(lambda g: (g * inv.astype(g.dtype)).astype(g.dtype), grads)
        finite = [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(unscaled)]
        found_inf = jnp.logical_not(jnp.all(jnp.stack(finite))) if finite else jnp.bool_(False)
        return unscaled, found_inf

    def update(self, found_inf: jax.Array) -> GradScaler:
        """PyTorch's `_amp_update_scale_`: back off on overflow (tracker reset), else count the
        step and grow the scale after `growth_interval` clean steps in a row (only if the
        grown scale is finite)."""
        tracker = self.growth_tracker + 1
        grow = tracker == self.growth_interval
        grown = self.scale * self.growth_factor
        clean_scale = jnp.where(grow & jnp.isfinite(grown), grown, self.scale)
        scale = jnp.where(found_inf, self.scale * self.backoff_factor, clean_scale)
        tracker = jnp.where(found_inf | grow, 0, tracker)
        return self.replace(scale=scale.astype(jnp.float32), growth_tracker=tracker)

    def state_dict(self) -> dict[str, Any]:
        """`torch.amp.GradScaler.state_dict()`: `scale`, the constants, `_growth_tracker`."""
        return {
            "scale": float(self.scale),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": int(self.growth_tracker),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> GradScaler:
        """The scaler `torch.amp.GradScaler.load_state_dict(state)` would make."""
        scaler = cls.create(
            state["scale"],
            state["growth_factor"],
            state["backoff_factor"],
            state["growth_interval"],
        )
        return scaler.replace(growth_tracker=jnp.asarray(state["_growth_tracker"], jnp.int32))


def skip_if_overflow(found_inf: jax.Array, old: Any, new: Any) -> Any:
    """`old` where the step overflowed, `new` otherwise (leaf by leaf, same structure): the
    skipped `optimizer.step()` of `GradScaler.step`."""
    return jax.tree.map(lambda a, b: jnp.where(found_inf, a, b), old, new)
