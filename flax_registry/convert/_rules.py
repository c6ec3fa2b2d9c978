"""The rule table: per flax layer type (or module path), which torch key each variable becomes.

A rule is data. A `Rule` lists entries, in torch's `state_dict` order:

- `Map`: one torch tensor <- one flax variable, with a `Layout` (a '/'-path may reach below
  the layer, a dotted torch name below the torch module: a variable moved across levels);
- `Fused`: one torch tensor <- several flax variables concatenated (`in_proj_weight`);
- `Stacked`: several torch tensors <- one flax variable, one per index of a new axis
  (`q_proj`, `k_proj`, `v_proj` as one `qkv (3, ...)`), the reverse of `Fused`;
- `TorchOnly`: tensors torch keeps and flax does not (`num_batches_tracked`);
- `Child`: a flax child scope under another torch name (`pre_attention_norm` is
  `input_layernorm`), mapped by its own rule or the one given.

`Scanned` is a rule for a whole module whose variables hold L layers on a leading axis
(`nn.scan` / `nnx.scan`): layer i is torch's `layers.{i}`, mapped by the inner layers' rules.
Rules are picked by module path (`rules={"decoder.layers": Scanned()}`), else by the layer's
type (the first type in its MRO with a rule), never by names or ranks; every layout is a pure
permutation / reshape / flip and every stack a selection, so torch -> flax -> torch is
bit-identical.

The built-in table (torch layout on the right):

==================================  ==============================================================
flax layer                          torch
==================================  ==============================================================
Dense  kernel (in, out)             Linear weight (out, in), bias
DenseGeneral kernel (*in, *out)     Linear weight (prod(out), prod(in)), bias (prod(out),)
Einsum kernel, by its einsum_str    Linear weight (prod(out axes), prod(in axes)), bias
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
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from .._patterns import matches
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
class Stacked:
    """Torch keys `torch` (tensors of one shape) are the slices of flax variable `flax` along
    its axis `axis`, in order: the reverse of `Fused`. `Stacked(("q_proj.weight",
    "k_proj.weight", "v_proj.weight"), "qkv/kernel", layout=...)` keeps three torch tensors as
    one `(3, ...)` array. `layout` maps one slice (the variable without `axis`) to its torch
    tensor, as a `Map`'s layout maps a whole variable (a function of the layer gets the slice
    shape). `torch` may be one template with `{i}` (`"experts.{i}.weight"`): one key per index
    of `axis`. Skipped when the layer has no variable `flax`.

    Example:
        >>> import numpy as np, flax.linen as nn
        >>> import flax_registry as fr
        >>> from flax_registry.convert import LINEAR, Rule, Stacked
        >>> class GateUp(nn.Module):   # gate and up projections as one (2, in, out) kernel
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         w = self.param("w", nn.initializers.ones, (2, x.shape[-1], 4))
        ...         return (x @ w[0]) * (x @ w[1])
        >>> rules = {GateUp: Rule(Stacked(("gate_proj.weight", "up_proj.weight"), "w", layout=LINEAR))}
        >>> sd = {"gate_proj.weight": np.ones((4, 3), np.float32),
        ...       "up_proj.weight": np.zeros((4, 3), np.float32)}
        >>> variables, _ = fr.from_torch(GateUp(), sd, example_inputs=(np.ones((1, 3)),), rules=rules)
        >>> variables["params"]["w"].shape
        (2, 3, 4)
        >>> {k: v.shape for k, v in fr.to_torch(GateUp(), variables, rules=rules).items()}
        {'gate_proj.weight': (4, 3), 'up_proj.weight': (4, 3)}
    """

    torch: tuple[str, ...] | str
    flax: str
    axis: int = 0
    collection: str = PARAMS
    layout: LayoutSpec = IDENTITY


@dataclasses.dataclass(frozen=True)
class Scanned:
    """A module whose every variable holds L layers stacked on axis `axis` (an `nn.scan` /
    `nnx.scan` over a block): layer i is the torch submodule `torch` with `{i}` replaced by
    i, below the module's own torch name (default `"{i}"`: the scanned module `layers` is
    torch's `layers.0` ... `layers.{L-1}`, a `ModuleList`). Each layer maps by `rule` (the rule
    of one layer) or, by default, by the rules of the layers inside, each seeing one layer's
    shapes; L is the length of `axis`, which every variable must share. Use it as a path rule
    (`rules={"decoder.layers": Scanned()}`) or as `Child(..., rule=Scanned())`.

    Differs from PyTorch: torch keeps L tensors per variable; here each is one slice of one
    array, read (and, when sharded, placed per device) a layer at a time.

    Example:
        >>> import numpy as np, flax.linen as nn
        >>> import flax_registry as fr
        >>> from flax_registry.convert import Scanned
        >>> class Block(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, _):
        ...         return nn.Dense(3, name="fc")(x), None
        >>> class Stack(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         scan = nn.scan(Block, variable_axes={"params": 0},
        ...                        split_rngs={"params": True}, length=2)
        ...         return scan(name="layers")(x, None)[0]
        >>> sd = {f"layers.{i}.fc.{name}": np.zeros(shape, np.float32)
        ...       for i in range(2) for name, shape in (("weight", (3, 3)), ("bias", (3,)))}
        >>> variables, report = fr.from_torch(
        ...     Stack(), sd, example_inputs=(np.ones((1, 3)),), rules={"layers": Scanned()})
        >>> variables["params"]["layers"]["fc"]["kernel"].shape   # (L, in, out)
        (2, 3, 3)
        >>> report.ok
        True
    """

    torch: str = "{i}"
    axis: int = 0
    rule: Rule | None = None


@dataclasses.dataclass(frozen=True)
class Child:
    """Flax child scope `flax` (a direct child of the layer) is torch submodule `torch` (a
    dotted name below the layer's torch name): a renamed or moved submodule,
    `Child("input_layernorm", "pre_attention_norm")`. It maps by `rule` when given (a `Rule`
    or `Scanned`), else as it would under its own name (by its layer type's rule). Children a
    rule does not name keep their names."""

    torch: str
    flax: str
    rule: Rule | Scanned | None = None


RuleEntry = Map | Fused | Stacked | TorchOnly | Child


class RuleError(ValueError):
    """A rule that cannot describe the variables it is applied to (raised while planning,
    before any tensor is read); the walk adds the layer and its torch name."""


@dataclasses.dataclass(frozen=True)
class LayerPart:
    """One flax variable (or, with `select`, one slice of it) of a resolved torch tensor."""

    collection: str
    path: tuple[str, ...]  # relative to the layer
    layout: Layout
    select: tuple[tuple[int, int], ...] = ()  # (axis, index) taken in turn


@dataclasses.dataclass(frozen=True)
class Resolved:
    """One torch tensor of one layer: its local key and the flax variables it is made of."""

    torch: str
    parts: tuple[LayerPart, ...]
    axis: int = 0
    origin: Any = None  # the rule entry it comes from (for messages and stack checks)


@dataclasses.dataclass(frozen=True)
class Extra:
    torch: str
    value: np.ndarray
    reason: str


def _path(flax: str) -> tuple[str, ...]:
    return tuple(flax.split("/"))


def _layout_name(spec: LayoutSpec) -> str:
    if isinstance(spec, Layout):
        return "IDENTITY" if spec == IDENTITY else repr(spec)
    return getattr(spec, "__name__", repr(spec))


def describe(entry: Any) -> str:
    """A rule entry as its user wrote it, shortly (for messages)."""
    if isinstance(entry, Map):
        layout = "" if entry.layout == IDENTITY else f", layout={_layout_name(entry.layout)}"
        return f"Map({entry.torch!r}, {entry.flax!r}{layout})"
    if isinstance(entry, Stacked):
        layout = "" if entry.layout == IDENTITY else f", layout={_layout_name(entry.layout)}"
        return f"Stacked({entry.torch!r}, {entry.flax!r}, axis={entry.axis}{layout})"
    if isinstance(entry, Fused):
        return f"Fused({entry.torch!r}, {[p.flax for p in entry.parts]}, axis={entry.axis})"
    if isinstance(entry, Scanned):
        return f"Scanned(torch={entry.torch!r}, axis={entry.axis})"
    if isinstance(entry, Child):
        return f"Child({entry.torch!r}, {entry.flax!r})"
    return repr(entry)


def _layout_of(module: Any, spec: LayoutSpec, shape: tuple[int, ...]) -> Layout:
    return spec if isinstance(spec, Layout) else spec(module, shape)


def stacked_keys(entry: Stacked, length: int) -> tuple[str, ...]:
    """The torch keys of a `Stacked` whose axis has `length` entries."""
    if isinstance(entry.torch, str):
        if "{i}" not in entry.torch:
            raise RuleError(
                f"{describe(entry)}: a single torch name must be a template with '{{i}}' "
                "(e.g. 'experts.{i}.weight'); pass several keys as a tuple."
            )
        return tuple(entry.torch.replace("{i}", str(i)) for i in range(length))
    return tuple(entry.torch)


def _stacked(module: Any, entry: Stacked, variables: LayerVariables) -> list[Resolved]:
    key = (entry.collection, _path(entry.flax))
    if key not in variables:
        return []
    shape = tuple(variables[key].shape)
    where = "/".join((entry.collection, entry.flax))
    axis = entry.axis + len(shape) if entry.axis < 0 else entry.axis
    if not 0 <= axis < len(shape):
        raise RuleError(
            f"{describe(entry)}: flax variable '{where}' has shape {shape} ({len(shape)} axes), "
            f"so it has no axis {entry.axis} to stack on. Fix the axis (0 for a leading "
            "stack axis) or the variable name."
        )
    keys = stacked_keys(entry, shape[axis])
    if len(keys) != shape[axis]:
        raise RuleError(
            f"{describe(entry)}: stacks {len(keys)} torch keys {list(keys)} on axis {axis}, but "
            f"flax variable '{where}' has shape {shape}, whose axis {axis} holds "
            f"{shape[axis]}. Give one torch key per index of the stacked axis."
        )
    inner = shape[:axis] + shape[axis + 1 :]
    layout = _layout_of(module, entry.layout, inner)
    return [
        Resolved(torch, (LayerPart(entry.collection, key[1], layout, ((axis, i),)),), 0, entry)
        for i, torch in enumerate(keys)
    ]


class Rule:
    """How one flax layer type maps to torch: `Map`, `Fused`, `Stacked`, `TorchOnly` and `Child`
    entries, in torch's `state_dict` order. Subclass and override `expand` for layouts that
    depend on shapes."""

    def __init__(self, *entries: RuleEntry) -> None:
        self.entries = tuple(entries)
        bad = [e for e in self.entries if not isinstance(e, RuleEntry)]
        if bad:
            raise TypeError(
                f"Rule entries are Map, Fused, Stacked, TorchOnly or Child, got {bad!r}; a "
                "Scanned is a rule of its own: rules={'<module path>': Scanned()} or "
                "Child('<torch name>', '<flax name>', rule=Scanned())."
            )

    def __repr__(self) -> str:
        return f"Rule{self.entries!r}"

    @property
    def children(self) -> tuple[Child, ...]:
        """The rule's `Child` entries (renamed or moved submodules)."""
        return tuple(e for e in self.entries if isinstance(e, Child))

    def expand(self, module: Any, variables: LayerVariables) -> tuple[list[Resolved], list[Extra]]:
        """The torch tensors of one layer instance, given its variables (relative paths)."""
        tensors: list[Resolved] = []
        extras: list[Extra] = []
        for entry in self.entries:
            if isinstance(entry, Child):
                continue
            if isinstance(entry, TorchOnly):
                if (entry.collection, _path(entry.when)) in variables:
                    extras.append(Extra(entry.torch, np.asarray(entry.value), entry.reason))
                continue
            if isinstance(entry, Stacked):
                tensors.extend(_stacked(module, entry, variables))
                continue
            maps = entry.parts if isinstance(entry, Fused) else (entry,)
            parts = [_part(module, m, variables) for m in maps]
            if any(p is None for p in parts):
                continue
            axis = entry.axis if isinstance(entry, Fused) else 0
            kept = tuple(p for p in parts if p is not None)
            tensors.append(Resolved(entry.torch, kept, axis, entry))
        return tensors, extras


def _part(module: Any, m: Map, variables: LayerVariables) -> LayerPart | None:
    key = (m.collection, _path(m.flax))
    if key not in variables:
        return None
    return LayerPart(m.collection, key[1], _layout_of(module, m.layout, variables[key].shape))


BUILTIN_RULES: dict[type, Rule] = {}
"""The rules each front-end adapter registers for its Flax API's own layers (see
`flax_registry._linen.rules`)."""

AnyRule = Rule | Scanned
Rules = Mapping[Any, AnyRule]
"""Per-call rules: keys are layer types, or module path patterns: a glob (`*` spans dots) or a
`re.Pattern` over the module's torch name as the walk names it (after the `Child` renames
above it), `"decoder.layers"`, `"layers.*.self_attn"`. Inside a scanned module the layer
index is the literal `{i}` (`"layers.{i}.self_attn"`), which `*` matches. A path rule wins
over a type rule."""

_USER_RULES: dict[type, AnyRule] = {}


def register_rule(layer_type: type, rule: AnyRule) -> None:
    """Use `rule` for every flax layer of `layer_type` (and its subclasses without their own
    rule) in all later `from_torch` / `to_torch` calls; replaces an earlier rule for the type.

    Example, for a layer keeping a `kernel` (in, out) and a `scale` (out,) in `params`::

        register_rule(MyLayer, Rule(Map("weight", "kernel", layout=LINEAR), Map("gain", "scale")))

    Pass `rules={MyLayer: rule}` to `from_torch` / `to_torch` to use a rule for one call only,
    and `rules={"encoder.layers.*.attn": rule}` for the modules at a path, when one class is
    used in several layouts. A class from another package is registered the same way (import
    it and pass it): rules follow the MRO, so subclasses without a rule of their own use it.

    Args:
        layer_type: the layer class (subclasses without their own rule use it too).
        rule: the `Rule` (or `Scanned`, for a module type that always holds scanned layers).

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
    if not isinstance(rule, Rule | Scanned):
        raise TypeError(
            f"register_rule expects a flax_registry.convert.Rule, got {type(rule).__name__}; "
            "build one as Rule(Map('weight', 'kernel', layout=LINEAR), ...)."
        )
    _USER_RULES[layer_type] = rule


def unregister_rule(layer_type: type) -> None:
    """Forget a rule added with `register_rule` (the built-in rule, if any, applies again)."""
    _USER_RULES.pop(layer_type, None)


def find_rule(layer_type: type, overrides: Rules | None = None) -> AnyRule | None:
    """The rule for `layer_type`: the first class in its MRO with a per-call, registered or
    built-in rule (in that order of precedence), or None. Path keys of `overrides` are
    ignored here (see `rule_at`)."""
    tables: Iterable[Mapping[Any, AnyRule]] = (overrides or {}, _USER_RULES, BUILTIN_RULES)
    for cls in layer_type.__mro__:
        for table in tables:
            if cls in table:
                return table[cls]
    return None


def rule_at(overrides: Rules | None, torch_name: str) -> AnyRule | None:
    """The first path rule of `overrides` whose pattern matches the module's torch name."""
    for pattern, rule in (overrides or {}).items():
        if isinstance(pattern, type):
            continue
        if not isinstance(pattern, str | re.Pattern):
            raise TypeError(
                f"rules= keys are layer types or module path patterns (str or re.Pattern), got "
                f"{pattern!r}."
            )
        if not isinstance(rule, Rule | Scanned):
            raise TypeError(f"rules[{pattern!r}] must be a Rule or Scanned, got {rule!r}.")
        if matches(pattern, [torch_name]):
            return rule
    return None
