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
from collections.abc import Callable, Iterable, Mapping, Sequence
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


# --- layouts that depend on the layer ----------------------------------------------------------


def conv_layout(module: Any, shape: tuple[int, ...]) -> Layout:
    """ConvNd: torch (out, in/groups, *k) <-> flax (*k, in/groups, out)."""
    n = len(shape) - 2
    return Layout(perm=(*range(2, n + 2), 1, 0))


def conv_transpose_layout(module: Any, shape: tuple[int, ...]) -> Layout:
    """ConvTransposeNd: torch (in, out, *k) <-> flax (*k, in, out) flipped spatially, or, with
    `transpose_kernel=True`, flax (*k, out, in) unflipped (flax then flips it itself)."""
    n = len(shape) - 2
    if getattr(module, "transpose_kernel", False):
        return Layout(perm=(*range(2, n + 2), 1, 0))
    return Layout(perm=(*range(2, n + 2), 0, 1), flip=tuple(range(n)))


def _features(module: Any) -> int:
    features = module.features
    return len(features) if isinstance(features, Sequence) else 1


def dense_general_layout(module: Any, shape: tuple[int, ...]) -> Layout:
    """DenseGeneral kernel (*in, *out) <-> Linear weight (prod(out), prod(in))."""
    if getattr(module, "batch_dims", ()):
        raise ValueError(
            f"{type(module).__name__} with batch_dims={module.batch_dims} has no torch Linear "
            "counterpart; register a rule for it with flax_registry.convert.register_rule."
        )
    n_out = _features(module)
    n_in = len(shape) - n_out
    return Layout(perm=(*range(n_out, n_out + n_in), *range(n_out)), merge=(n_out, n_in))


def dense_general_bias_layout(module: Any, shape: tuple[int, ...]) -> Layout:
    """DenseGeneral bias (*out) <-> Linear bias (prod(out),)."""
    return Layout(merge=(len(shape),))


QKV_WEIGHT = Layout(perm=(2, 0, 1), merge=(2, 1))  # (in, heads, head_dim) <-> (heads*head_dim, in)
QKV_BIAS = Layout(merge=(2,))  # (heads, head_dim) <-> (heads*head_dim,)
OUT_WEIGHT = Layout(
    perm=(1, 2, 0), merge=(1, 2)
)  # (heads, head_dim, out) <-> (out, heads*head_dim)


class MultiHeadAttentionRule(Rule):
    """`nn.MultiHeadDotProductAttention` <-> `torch.nn.MultiheadAttention` (default), or, with
    `fused=False`, four separate Linear layers named by `names` (e.g. Hugging Face's
    `{"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}`).

    Fused layout: `in_proj_weight` (3E, E) holds the query, key and value weights as rows
    [0:E], [E:2E], [2E:3E] (each (heads*head_dim, in), heads outermost), `in_proj_bias` (3E,)
    likewise; when the key or value input size differs from the query's, torch keeps
    `q_proj_weight`, `k_proj_weight`, `v_proj_weight` instead (bias still fused).
    `out_proj.weight` is (out, heads*head_dim). Extra flax children (`query_ln`, `key_ln` with
    `normalize_qk=True`) keep their own rules.
    """

    def __init__(self, fused: bool = True, names: Mapping[str, str] | None = None) -> None:
        self.fused = fused
        self.names = dict(names or {"query": "query", "key": "key", "value": "value", "out": "out"})
        super().__init__()

    def __repr__(self) -> str:
        return f"MultiHeadAttentionRule(fused={self.fused}, names={self.names})"

    def expand(self, module: Any, variables: LayerVariables) -> tuple[list[Resolved], list[Extra]]:
        qkv = ("query", "key", "value")
        if not self.fused:
            entries: list[Map | Fused | TorchOnly] = []
            for name in (*qkv, "out"):
                torch_name = self.names.get(name, name)
                w, b = (OUT_WEIGHT, IDENTITY) if name == "out" else (QKV_WEIGHT, QKV_BIAS)
                entries.append(Map(f"{torch_name}.weight", f"{name}/kernel", layout=w))
                entries.append(Map(f"{torch_name}.bias", f"{name}/bias", layout=b))
            return Rule(*entries).expand(module, variables)
        in_sizes = {variables[(PARAMS, (n, "kernel"))].shape[0] for n in qkv}
        fused: list[Map | Fused | TorchOnly] = []
        if len(in_sizes) == 1:
            parts = tuple(Map("", f"{n}/kernel", layout=QKV_WEIGHT) for n in qkv)
            fused.append(Fused("in_proj_weight", parts))
        else:
            fused.extend(Map(f"{n[0]}_proj_weight", f"{n}/kernel", layout=QKV_WEIGHT) for n in qkv)
        fused.append(
            Fused("in_proj_bias", tuple(Map("", f"{n}/bias", layout=QKV_BIAS) for n in qkv))
        )
        fused.append(Map("out_proj.weight", "out/kernel", layout=OUT_WEIGHT))
        fused.append(Map("out_proj.bias", "out/bias"))
        return Rule(*fused).expand(module, variables)


NUM_BATCHES_REASON = (
    "flax BatchNorm keeps no batch counter (torch uses it only with momentum=None); "
    "its value is kept in LoadReport.extras and written back by to_torch(..., report=)"
)

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
