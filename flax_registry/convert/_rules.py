"""The rule table: per flax layer type, which torch key each variable becomes and in what layout.

A rule is data: a `Rule` lists `Map`s (one torch tensor <- one flax variable, with a `Layout`),
`Fused` maps (one torch tensor <- several flax variables concatenated, as `in_proj_weight`) and
`TorchOnly` keys (tensors torch keeps and flax does not, as `num_batches_tracked`). Rules are
picked by the layer's type (the first type in its MRO with a rule), never by names or ranks,
and every layout is a pure permutation / reshape / flip, so torch -> flax -> torch is
bit-identical.

The built-in table (torch layout on the right):

==================================  ==============================================================
flax layer                          torch
==================================  ==============================================================
Dense  kernel (in, out)             Linear weight (out, in), bias
DenseGeneral kernel (*in, *out)     Linear weight (prod(out), prod(in)), bias (prod(out),)
Conv   kernel (*k, in/g, out)       ConvNd weight (out, in/g, *k), bias (N = 1, 2, 3, grouped)
ConvTranspose kernel (*k, in, out)  ConvTransposeNd weight (in, out, *k), spatially flipped
  transpose_kernel=True (*k,out,in)   same weight, not flipped
BatchNorm scale, bias, mean, var    BatchNorm weight, bias, running_mean, running_var,
                                    num_batches_tracked (torch only: 0 on export)
LayerNorm / GroupNorm / RMSNorm     weight (= scale), bias
Embed  embedding                    Embedding weight
MultiHeadDotProductAttention        MultiheadAttention in_proj_weight / in_proj_bias (q, k, v
                                    rows), or q_proj_weight/k_proj_weight/v_proj_weight when the
                                    key/value inputs differ in size; out_proj.weight / .bias
==================================  ==============================================================

Padding is not a weight: torch `ConvTransposeNd(k, stride=s, padding=p, output_padding=o,
dilation=d)` equals flax `ConvTranspose(..., padding=((d*(k-1)-p, d*(k-1)-p+o),)*N)`, and a
strided torch Conv with symmetric padding needs explicit flax padding, not 'SAME'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from .._registry import PARAMS
from ._layout import IDENTITY, Layout

BATCH_STATS = "batch_stats"

VarKey = tuple[str, tuple[str, ...]]  # (collection, path relative to the layer)
LayerVariables = Mapping[VarKey, Any]  # leaves: arrays or jax.ShapeDtypeStruct


LayoutSpec = Layout | Callable[[Any, tuple[int, ...]], Layout]
"""A layout, or a function `(flax module, flax shape) -> Layout` for layouts that depend on the
layer's attributes or rank."""


@dataclasses.dataclass(frozen=True)
class Map:
    """Torch key `torch` holds flax variable `flax` (a '/'-path below the layer) of `collection`.

    A map whose flax variable the layer does not have (e.g. `bias` with `use_bias=False`) is
    skipped: torch's layer then has no such key either.
    """

    torch: str
    flax: str
    collection: str = PARAMS
    layout: LayoutSpec = IDENTITY


@dataclasses.dataclass(frozen=True)
class Fused:
    """Torch key `torch` is the concatenation along torch axis `axis` of several flax variables
    (`parts`, in order), as `in_proj_weight` holds the query, key and value projections."""

    torch: str
    parts: tuple[Map, ...]
    axis: int = 0


@dataclasses.dataclass(frozen=True)
class TorchOnly:
    """A tensor torch keeps and the flax layer does not (`num_batches_tracked`): dropped on
    import (listed in the report, its value kept there) and synthesised on export as `value`
    (or the imported value, given the report). Emitted when flax variable `when` exists."""

    torch: str
    when: str
    value: Any
    reason: str
    collection: str = BATCH_STATS


@dataclasses.dataclass(frozen=True)
class LayerPart:
    """One flax variable of a resolved torch tensor."""

    collection: str
    path: tuple[str, ...]  # relative to the layer
    layout: Layout


@dataclasses.dataclass(frozen=True)
class Resolved:
    """One torch tensor of one layer: its local key and the flax variables it is made of."""

    torch: str
    parts: tuple[LayerPart, ...]
    axis: int = 0


@dataclasses.dataclass(frozen=True)
class Extra:
    torch: str
    value: np.ndarray
    reason: str


def _path(flax: str) -> tuple[str, ...]:
    return tuple(flax.split("/"))


class Rule:
    """How one flax layer type maps to torch: `Map`, `Fused` and `TorchOnly` entries, in torch's
    `state_dict` order. Subclass and override `expand` for layouts that depend on shapes."""

    def __init__(self, *entries: Map | Fused | TorchOnly) -> None:
        self.entries = tuple(entries)

    def __repr__(self) -> str:
        return f"Rule{self.entries!r}"

    def expand(self, module: Any, variables: LayerVariables) -> tuple[list[Resolved], list[Extra]]:
        """The torch tensors of one layer instance, given its variables (relative paths)."""
        tensors: list[Resolved] = []
        extras: list[Extra] = []
        for entry in self.entries:
            if isinstance(entry, TorchOnly):
                if (entry.collection, _path(entry.when)) in variables:
                    extras.append(Extra(entry.torch, np.asarray(entry.value), entry.reason))
                continue
            maps = entry.parts if isinstance(entry, Fused) else (entry,)
            parts = [_part(module, m, variables) for m in maps]
            if any(p is None for p in parts):
                continue
            axis = entry.axis if isinstance(entry, Fused) else 0
            tensors.append(Resolved(entry.torch, tuple(p for p in parts if p is not None), axis))
        return tensors, extras


def _part(module: Any, m: Map, variables: LayerVariables) -> LayerPart | None:
    key = (m.collection, _path(m.flax))
    if key not in variables:
        return None
    layout = m.layout if isinstance(m.layout, Layout) else m.layout(module, variables[key].shape)
    return LayerPart(m.collection, key[1], layout)


BUILTIN_RULES: dict[type, Rule] = {}
"""The rules each front-end adapter registers for its Flax API's own layers (see
`flax_registry._linen.rules`)."""

_USER_RULES: dict[type, Rule] = {}


def register_rule(layer_type: type, rule: Rule) -> None:
    """Use `rule` for every flax layer of `layer_type` (and its subclasses without their own
    rule) in all later `from_torch` / `to_torch` calls; replaces an earlier rule for the type.

    Example, for a layer keeping a `kernel` (in, out) and a `scale` (out,) in `params`::

        register_rule(MyLayer, Rule(Map("weight", "kernel", layout=LINEAR), Map("gain", "scale")))

    Pass `rules={MyLayer: rule}` to `from_torch` / `to_torch` to use a rule for one call only.

    Args:
        layer_type: the layer class (subclasses without their own rule use it too).
        rule: the `Rule`.

    Returns:
        None.

    Example:
        >>> import numpy as np, flax.linen as nn
        >>> import flax_registry as fr
        >>> from flax_registry.convert import LINEAR, Map, Rule, unregister_rule
        >>> class Scaled(nn.Module):   # a custom layer: kernel (in, out) and a gain
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         kernel = self.param("kernel", nn.initializers.ones, (x.shape[-1], 2))
        ...         return x @ kernel * self.param("gain", nn.initializers.ones, (2,))
        >>> fr.register_rule(Scaled, Rule(Map("weight", "kernel", layout=LINEAR), Map("g", "gain")))
        >>> torch_state = {"weight": np.ones((2, 3), np.float32), "g": np.ones(2, np.float32)}
        >>> variables, _ = fr.from_torch(Scaled(), torch_state, example_inputs=(np.ones((1, 3)),))
        >>> variables["params"]["kernel"].shape
        (3, 2)
        >>> unregister_rule(Scaled)
    """
    if not isinstance(layer_type, type):
        raise TypeError(f"register_rule expects a layer class, got {layer_type!r}")
    if not isinstance(rule, Rule):
        raise TypeError(
            f"register_rule expects a flax_registry.convert.Rule, got {type(rule).__name__}; "
            "build one as Rule(Map('weight', 'kernel', layout=LINEAR), ...)."
        )
    _USER_RULES[layer_type] = rule


def unregister_rule(layer_type: type) -> None:
    """Forget a rule added with `register_rule` (the built-in rule, if any, applies again)."""
    _USER_RULES.pop(layer_type, None)


def find_rule(layer_type: type, overrides: Mapping[type, Rule] | None = None) -> Rule | None:
    """The rule for `layer_type`: the first class in its MRO with a per-call, registered or
    built-in rule (in that order of precedence), or None."""
    tables: Iterable[Mapping[type, Rule]] = (overrides or {}, _USER_RULES, BUILTIN_RULES)
    for cls in layer_type.__mro__:
        for table in tables:
            if cls in table:
                return table[cls]
    return None
