"""`Module`: `flax.nnx.Module` with PyTorch's `register_parameter` / `register_buffer` and its
state API as methods.

NNX modules are mutable objects that hold their variables, as PyTorch modules hold their
tensors, so the contract maps directly: `register_parameter` sets an `nnx.Param` attribute,
`register_buffer` a `Buffer` (with `persistent`), a submodule assigned to an attribute is a
child, a plain array attribute is neither, and the order of assignment is PyTorch's order.
The listing methods (`named_parameters`, `state_dict`, ...) are the library's pure functions
on this module; `load_state_dict` loads in place, as PyTorch's does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from .. import state
from .._messages import check_torch_name
from .._parameter import Parameter, check_buffer, check_parameter, is_array_like, typename
from .variables import Buffer

if TYPE_CHECKING:
    from ..state import IncompatibleKeys

ORDER = "_fr_order"
"""The static attribute holding the names in assignment order (PyTorch's registration order)."""

_NEEDS_RNGS = (
    "{what} '{name}' of {cls} is given an initializer, which needs a random key: pass "
    "rngs=rngs (the module's nnx.Rngs), e.g. self.register_{what}('{name}', ..., rngs=rngs), "
    "or give a concrete array."
)


def _key(rngs: Any, what: str, name: str, module: Any) -> Any:
    if rngs is None:
        raise ValueError(_NEEDS_RNGS.format(what=what, name=name, cls=type(module).__name__))
    if isinstance(rngs, nnx.Rngs):
        return rngs.params()
    return rngs  # a jax.random key


class Module(nnx.Module):
    """A `flax.nnx.Module` with PyTorch's module-state contract.

    In `__init__`:

    - `register_parameter(name, Parameter(...) | None, rngs=...)` sets an `nnx.Param`
      (`Parameter(trainable=False)`: PyTorch's `requires_grad_(False)`); `self.w =
      nnx.Param(...)` registers one as well, as `self.w = nn.Parameter(t)` does in PyTorch;
    - `register_buffer(name, value, persistent=True)` sets a `Buffer`, which no optimizer
      sees; `persistent=False` keeps it out of `state_dict()` and of checkpoints;
    - `register_module(name, module)` adds a child under a name an attribute cannot take;
    - a plain array attribute is neither a parameter nor a buffer (PyTorch's rule): it is in
      no listing and no checkpoint.

    Differences from `torch.nn.Module`: train/eval mode is NNX's (`model.train()` /
    `model.eval()`), and variables are replaced, not mutated in place, under `nnx.jit`.
    """

    # --- registration ---------------------------------------------------------------------

    def register_parameter(
        self, name: str, param: Parameter | None, *, rngs: nnx.Rngs | jax.Array | None = None
    ) -> None:
        """Add a parameter, as `torch.nn.Module.register_parameter`: an `nnx.Param`, or `None`
        (registered and absent: listed nowhere). A bare array raises `TypeError`, as PyTorch
        does for a plain tensor. An initializer (`Parameter(init, shape)`) needs `rngs`."""
        self._check_new(name, "parameter")
        if param is None:
            super().__setattr__(name, None)
            return
        check_parameter(name, param)
        key = (
            jax.random.key(0) if is_array_like(param.data) else _key(rngs, "parameter", name, self)
        )
        value = param.initial_value(key)  # an array ignores the key
        meta = {} if param.trainable else {"trainable": False}
        setattr(self, name, nnx.Param(value, **meta))

    def register_buffer(
        self,
        name: str,
        tensor: Any,
        persistent: bool = True,
        *,
        shape: tuple[int, ...] | None = None,
        dtype: Any = None,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> None:
        """Add a buffer, as `torch.nn.Module.register_buffer`: a `Buffer` holding `tensor` (an
        array, a zero-argument callable, or `init(key, shape, dtype)` with `shape` and
        `rngs`), or `None` (registered and absent)."""
        self._check_new(name, "buffer")
        if tensor is None:
            super().__setattr__(name, None)
            return
        check_buffer(name, tensor)
        if is_array_like(tensor):
            value = jnp.asarray(tensor)
        elif shape is None:
            value = jnp.asarray(tensor())
        else:
            key = _key(rngs, "buffer", name, self)
            value = jnp.asarray(tensor(key, tuple(shape), dtype or jnp.float32))
        setattr(self, name, Buffer(value, persistent=persistent))

    def register_module(self, name: str, module: nnx.Module | None) -> None:
        """Add a child module under `name`, as `torch.nn.Module.register_module` (`add_module`),
        for names an attribute cannot take (`"0"`, `"1"`, ... in a container)."""
        if module is not None and not isinstance(module, nnx.Module):
            raise TypeError(f"{typename(module)} is not a Module subclass")
        self._check_new(name, "module")
        if module is None:
            super().__setattr__(name, None)
        else:
            setattr(self, name, module)

    def _check_new(self, name: Any, what: str) -> None:
        check_torch_name(name, what)
        if name in vars(self) or hasattr(type(self), name):
            raise KeyError(f"attribute '{name}' already exists")

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Parameter):
            self.register_parameter(name, value)
            return
        super().__setattr__(name, value)
        if not name.startswith("_pytree__") and name != ORDER:
            order = vars(self).get(ORDER, ())
            if name not in order:  # NNX sorts attributes in split/merge: keep the order here
                super().__setattr__(ORDER, (*order, name))

    # --- PyTorch's state API, as methods ----------------------------------------------------

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, jax.Array]]:
        return state.named_parameters(self, None, prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True) -> Iterator[jax.Array]:
        return (v for _, v in self.named_parameters(recurse=recurse))

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, jax.Array]]:
        return state.named_buffers(self, None, prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> Iterator[jax.Array]:
        return (v for _, v in self.named_buffers(recurse=recurse))

    def named_modules(
        self, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Any]]:
        return state.named_modules(self, None, prefix, remove_duplicate)

    def state_dict(self, prefix: str = "", keep_vars: bool = False) -> dict[str, jax.Array]:
        """`state.state_dict` of this module (`keep_vars` is accepted for PyTorch
        compatibility: JAX arrays carry no autograd graph)."""
        return state.state_dict(self, None, prefix)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> IncompatibleKeys:
        """Load in place, as `torch.nn.Module.load_state_dict`; returns `IncompatibleKeys`."""
        return state.load_state_dict(self, state_dict, strict=strict)  # type: ignore[return-value]

    def get_submodule(self, target: str) -> Any:
        return state.get_submodule(self, None, target)

    def get_parameter(self, target: str) -> jax.Array:
        return state.get_parameter(self, None, target)

    def get_buffer(self, target: str) -> jax.Array:
        return state.get_buffer(self, None, target)
