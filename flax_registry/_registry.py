"""The ordered table of what one module registered: parameters, buffers and submodules.

This is the counterpart of a PyTorch module's `_parameters`, `_buffers` and `_modules`
dictionaries, plus `_non_persistent_buffers_set`. It holds no arrays: values live in the
variables, and the table says which variable is what. It knows nothing of linen, so the NNX
front-end can fill it too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Kind = Literal["parameter", "buffer"]

PARAMS = "params"
BUFFERS = "buffers"


@dataclasses.dataclass(frozen=True)
class Slot:
    """One registered tensor of one module.

    `path` is the variable's path inside `collection`, from the root of the variables. A tied
    parameter's path points at the module that owns the variable, so two slots with the same
    `(collection, path)` are one tensor under two names.
    """

    name: str
    kind: Kind
    collection: str
    path: tuple[str, ...]
    persistent: bool = True
    trainable: bool = True

    @property
    def ident(self) -> tuple[str, tuple[str, ...]]:
        return (self.collection, self.path)


@dataclasses.dataclass
class Registry:
    """What one module instance registered, in registration order.

    A `None` value records a registered-but-absent parameter or buffer (PyTorch's
    `register_parameter("bias", None)`): it takes the name but is left out of every listing.
    `modules` maps a PyTorch-style local name (`"fc"`, `"layers.0"`) to the linen attribute
    value (a bound submodule).
    """

    parameters: dict[str, Slot | None] = dataclasses.field(default_factory=dict)
    buffers: dict[str, Slot | None] = dataclasses.field(default_factory=dict)
    modules: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Values of non-persistent buffers whose variable was not passed to apply: as in
    # PyTorch, where `__init__` recomputes them, they come from their initial value.
    fallback: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Ties declared by this module: "child.weight" -> "other.weight" (relative names).
    ties: dict[str, str] = dataclasses.field(default_factory=dict)
    # Attribute names that hold submodules (a list attribute `layers` -> "layers").
    module_attrs: set[str] = dataclasses.field(default_factory=set)

    def owns(self, name: str) -> bool:
        return (
            name in self.parameters
            or name in self.buffers
            or name in self.modules
            or name in self.module_attrs
        )
