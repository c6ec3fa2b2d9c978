"""`Parameter`: what `register_parameter` accepts, the counterpart of `torch.nn.Parameter`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Initializer = Callable[..., Any]

_NEEDS_SHAPE = (
    "Parameter({init!r}) wraps an initializer but no shape: an initializer is called as "
    "init(key, shape, dtype), so pass the shape, e.g. Parameter(nn.initializers.zeros, (3, 4))."
)


@dataclasses.dataclass(frozen=True, eq=False)
class Parameter:
    """A learnable tensor to register with `Module.register_parameter`.

    Wraps either a concrete array (`Parameter(jnp.ones(3))`) or a flax-style initializer
    with its shape and dtype (`Parameter(nn.initializers.lecun_normal(), (out, in))`).

    Differences from `torch.nn.Parameter`:
      - it is a declaration, not a tensor: the value lives in the `params` collection of the
        variables, and inside `__call__` `self.<name>` reads the current value;
      - `trainable=False` is the counterpart of `requires_grad_(False)`: the parameter stays in
        `named_parameters()` and `state_dict()`, but the optimizer helpers in
        `flax_registry.train` neither update it nor keep optimizer state for it.
    """

    data: Any
    shape: tuple[int, ...] | None = None
    dtype: Any = None
    trainable: bool = True

    def __post_init__(self) -> None:
        if callable(self.data) and not _is_array(self.data):
            if self.shape is None:
                raise TypeError(_NEEDS_SHAPE.format(init=self.data))
            object.__setattr__(self, "shape", tuple(int(d) for d in _as_shape(self.shape)))
        elif not _is_array(self.data):
            raise TypeError(
                f"Parameter() takes an array or an initializer, got {typename(self.data)!r}; "
                "wrap a Python number as jnp.asarray(x)."
            )

    def initial_value(self, key: Array) -> Array:
        """The value the parameter starts with (calls the initializer with `key`)."""
        if _is_array(self.data):
            value = jnp.asarray(self.data)
            return value if self.dtype is None else value.astype(self.dtype)
        dtype = jnp.float32 if self.dtype is None else self.dtype
        return jnp.asarray(self.data(key, self.shape, dtype))


def _as_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct)


def is_array_like(x: Any) -> bool:
    """True for the values `register_buffer` takes as a concrete value."""
    return _is_array(x)


def typename(x: Any) -> str:
    """A readable type name for error messages, as `torch.typename` gives for tensors."""
    if isinstance(x, jax.Array):
        return "jax.Array"
    cls = type(x)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    return f"{module.split('.')[0]}.{cls.__qualname__}"


def check_parameter(name: str, param: Any) -> None:
    """`register_parameter`'s type check: PyTorch's TypeError for anything but a `Parameter`
    (a bare array included, as for a plain tensor). `None` is checked by the caller."""
    if not isinstance(param, Parameter):
        raise TypeError(
            f"cannot assign '{typename(param)}' object to parameter '{name}' "
            "(flax_registry.Parameter or None required)"
        )


def check_buffer(name: str, tensor: Any) -> None:
    """`register_buffer`'s type check: an array or an initializer (`None` is the caller's)."""
    if not (is_array_like(tensor) or callable(tensor)):
        raise TypeError(
            f"cannot assign '{typename(tensor)}' object to buffer '{name}' "
            "(array, initializer or None required)"
        )
