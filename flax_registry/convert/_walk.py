"""The conversion plan: every torch key of a flax model, the flax variables behind it, the layout.

`make_plan` walks the module tree (`flax_registry._tree.build_tree` over abstract variables) in
PyTorch's `state_dict` order. `flax_registry.Module`s map by identity (their registered names
are torch's); any other flax layer maps by the rule of its TYPE. Types come from the bound
modules themselves (setup-defined submodules), or, for compact modules whose layers exist only
inside `__call__`, from recording every module called while `init` runs under `jax.eval_shape`
on the example inputs (`flax.linen.intercept_methods`). Nothing is allocated.

Names: a flax submodule that flax named after its attribute keeps the attribute's name, and
list/tuple/dict attributes give torch's container names (`layers_0` -> `layers.0`, `blocks_1_0`
-> `blocks.1.0`, `heads_q` -> `heads.q`); `nn.Sequential` children are `0`, `1`, ... as in
`torch.nn.Sequential`. A submodule given an explicit `name=` keeps that name (the scope name
flax stores: `[Layer(name=str(i)) ...]` under `layer` is `layer.0`, as in the PyTorch twin), and
so does a layer created inside a compact `__call__` (`Dense_0`, or its `name=`). A submodule
held by two parents (one `nn.Embed` passed to an encoder and a decoder) is one set of
variables with a torch key under each parent, as PyTorch's `state_dict` lists a shared module.

Modules without a rule: a `flax_registry.Module` maps by its registered names; any other
module's own variables (raw `self.param(...)` / `self.variable(...)`) map to the torch key of
the same dotted path, unchanged, provided no two of the variable's axes have the same length
(> 1). Then no transpose of it has the same shape, so a layout difference cannot pass the
shape check; a variable with two equal axes (a square 2-D matrix) is refused, naming the
rule that fixes it, because its layout cannot be told from its shape. A variable called
`kernel` is refused too (flax's name for a weight in its (in, out) layout), and so are flax's
own layers without a rule: their conventions (`kernel`, `scale`) are not torch's.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from .._tree import Node, build_tree
from ..module import Module, _modules_in
from ._layout import IDENTITY, Layout
from ._record import Inputs, Records, as_inputs, record_layers, remembered
from ._rules import Rule, find_rule

IGNORED_COLLECTIONS = ("intermediates", "cache", "losses")
"""Collections that are not module state (sown values, decoding caches): never converted."""

_NO_TYPE = (
    "cannot convert flax scope '{path}' (variables {vars}): it was created inside a compact "
    "__call__, so its layer type is unknown and no rule can be picked. Pass example_inputs=(x,) "
    "(the inputs {cls}.init needs) so that the layer types can be recorded."
)
_NO_RULE = (
    "no conversion rule for {type} at flax scope '{path}' (its variables {vars}). Register one: "
    "flax_registry.convert.register_rule({type}, Rule(Map('weight', 'kernel', layout=LINEAR), "
    "...)), or pass rules={{{type}: ...}}; Rule(Map('<torch name>', '<flax name>')) maps a "
    "variable unchanged."
)
FLAX_LAYOUT_NAMES = ("kernel",)
"""Variable names that, in flax, denote a weight in flax's own layout (`kernel`: (in, out),
where torch keeps (out, in)): a layer without a rule that has one is refused, not loaded."""

_FLAX_NAMED = (
    "Its variable '{name}' is named as flax names weights it keeps in its own layout (a "
    "kernel is (..., in, out) where torch keeps (out, in, ...)), so it is not loaded "
    "unchanged; Rule(Map('{name}', '{name}')) says that it is stored exactly as in torch."
)
_AMBIGUOUS = (
    "cannot convert flax variable '{where}' of {type} (a layer with no conversion rule): its "
    "shape {shape} has two axes of the same length, so it may be stored in torch's order or "
    "transposed, and loading it unchanged could put every value in the wrong place. State "
    "its layout with a rule: flax_registry.convert.register_rule({type}, Rule(Map('<torch "
    "name>', '{name}', layout=LINEAR))) for a (in, out) kernel that torch keeps as (out, in), "
    "or Rule(Map('{name}', '{name}')) if it is stored exactly as in torch (or pass "
    "rules={{{type}: ...}} for one call)."
)
_BARE_PARAMS = (
    "variables= for {cls} has no collection level: its top-level keys {keys} are {what}, where "
    "flax expects collections such as 'params'. A Hugging Face model's `model.params` (or "
    "`params_shape_tree`) and flax's `variables['params']` are the 'params' collection "
    "alone: pass variables={{'params': tree}} (with every other collection beside it, e.g. "
    "{{'params': params, 'batch_stats': batch_stats}})."
)
_DOUBLE_WRAPPED = (
    "variables= for {cls} has its collection level twice: variables['params'] holds the "
    "collections {keys}. A Hugging Face model with batch statistics keeps all its "
    "collections in `model.params`: pass that tree itself as variables=, without wrapping "
    "it in {{'params': ...}}."
)
_LEFTOVER = (
    "the rule for {type} at flax scope '{path}' maps no torch key to flax variable(s) {vars}. "
    "Fix the rule (every variable of the layer needs a Map), or register a rule for {type}."
)
_EMPTY = (
    "{cls} has no variables to convert: {why}. Pass example_inputs=(x,) (the inputs "
    "{cls}.init needs) or variables= (an abstract or concrete variables tree)."
)


@dataclasses.dataclass(frozen=True)
class Part:
    """One flax variable behind a torch key."""

    collection: str
    path: tuple[str, ...]  # full path inside the collection
    layout: Layout
    leaf: Any  # the target leaf: jax.ShapeDtypeStruct or a concrete array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.leaf.shape)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return self.layout.torch_shape(self.shape)

    @property
    def where(self) -> str:
        return "/".join((self.collection, *self.path))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One torch tensor: the concatenation along torch axis `axis` of its parts. `layer` is
    the type of the layer it comes from; `raw` marks a variable of a layer without a rule,
    mapped unchanged."""

    key: str
    parts: tuple[Part, ...]
    axis: int = 0
    layer: str = ""
    raw: bool = False
    added_in: int | None = None  # a buffer added in this module `_version` (see Module)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        shapes = [p.torch_shape for p in self.parts]
        if len(shapes) == 1:
            return shapes[0]
        total = sum(s[self.axis] for s in shapes)
        return (*shapes[0][: self.axis], total, *shapes[0][self.axis + 1 :])


@dataclasses.dataclass
class Plan:
    """Every torch key of a model, in `state_dict` order."""

    cls: str
    target: dict[str, Any]  # the variables tree the plan was made from
    entries: dict[str, Entry] = dataclasses.field(default_factory=dict)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)  # alias -> canonical key
    extras: dict[str, tuple[np.ndarray, str]] = dataclasses.field(default_factory=dict)
    order: list[str] = dataclasses.field(default_factory=list)
    nonpersistent: dict[str, tuple[str, tuple[str, ...]]] = dataclasses.field(default_factory=dict)
    records: Records = dataclasses.field(default_factory=dict, repr=False)
    inputs: Inputs | None = None
    _owners: dict[tuple[Any, ...], str] = dataclasses.field(default_factory=dict)

    def add(
        self,
        key: str,
        parts: tuple[Part, ...],
        axis: int = 0,
        layer: str = "",
        raw: bool = False,
        added_in: int | None = None,
    ) -> None:
        ident = (axis, *((p.collection, p.path) for p in parts))
        if key in self.entries or key in self.aliases:
            return  # reached twice under one name (a shared module): one key
        if ident in self._owners:  # a tied parameter or a shared module: the same variables
            self.aliases[key] = self._owners[ident]
        else:
            self.entries[key] = Entry(key, parts, axis, layer, raw, added_in)
            self._owners[ident] = key
        self.order.append(key)

    def tie(self, alias: str, canonical: str) -> None:
        if canonical not in self.entries:
            raise KeyError(
                f"tied={{{alias!r}: {canonical!r}}}: {canonical!r} is not a key of {self.cls}; "
                f"its keys are {list(self.entries)[:20]}."
            )
        self.aliases[alias] = canonical
        if alias not in self.order:
            self.order.append(alias)


def _leaves(
    tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def record_modules(
    module: nn.Module, inputs: Inputs | None, variables: Any
) -> tuple[dict[str, Any], Records]:
    """The target variables (abstract unless `variables` is given) and the module called at
    each scope path during `init` (remembered from an earlier conversion of the same module
    when no example inputs are given)."""
    shapes: dict[str, Any] | None = None
    if inputs is not None:
        shapes, records = record_layers(module, inputs)
    else:
        records = dict(remembered(module))
    if variables is not None:
        _check_collections(module, variables, shapes)
        target = variables
    elif shapes is not None:
        target = shapes
    else:
        from .._apply import abstract_variables

        target = abstract_variables(module)
    return {c: v for c, v in dict(target).items() if c not in IGNORED_COLLECTIONS}, records


def _attribute_children(mod: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(torch name, attribute name, submodule) of a module's attributes, in assignment order.

    The attribute name is torch's container name (`layers_0` -> `layers.0`; `nn.Sequential`'s
    `layers_0` -> `0`). The torch name is the same for a submodule flax named after its
    attribute, and its own scope name for one given an explicit `name=`.
    """
    for attr, value in list(vars(mod).items()):
        if attr.startswith("_") or attr in ("parent", "scope", "name"):
            continue
        for dotted, child in _modules_in(value, attr):
            auto = child.name is None or child.name == dotted.replace(".", "_")
            if isinstance(mod, nn.Sequential) and attr == "layers":
                dotted = dotted.removeprefix("layers.")
            yield (dotted if auto or child.name is None else child.name), dotted, child


def _is_flax_layer(layer_type: type) -> bool:
    return layer_type.__module__.split(".")[0] == "flax"


def _ambiguous(shape: tuple[int, ...]) -> bool:
    """Two axes of the same length (> 1): a transpose of the variable has its shape."""
    long = [d for d in shape if d > 1]
    return len(set(long)) < len(long)


def _index(node: Node, out: dict[tuple[str, ...], Node]) -> dict[tuple[str, ...], Node]:
    if node.path not in out:
        out[node.path] = node
        for _, child in node.children:
            _index(child, out)
    return out


class _Walker:
    def __init__(
        self, plan: Plan, root: Node, records: Records, rules: Mapping[type, Rule] | None
    ) -> None:
        self.plan = plan
        self.records = records
        self.rules = rules
        self.root_cls = plan.cls
        self.nodes = _index(root, {})
        self.active: list[tuple[str, ...]] = []

    def visit(self, node: Node, prefix: str) -> None:
        if node.path in self.active:  # a module that holds one of its ancestors
            return
        self.active.append(node.path)
        try:
            self._visit(node, prefix)
        finally:
            self.active.pop()

    def _visit(self, node: Node, prefix: str) -> None:
        mod = node.module if node.module is not None else self.records.get(node.path)
        rule = find_rule(type(mod), self.rules) if mod is not None else None
        if rule is not None:
            self.apply_rule(node, prefix, mod, rule)
        elif isinstance(mod, Module):
            if node.module is None:  # reached through a plain flax parent: read its registry
                node = self.registry_node(mod, node.path)
            self.identity(node, prefix)
        else:
            own = node.parameters + node.buffers
            if own:
                where = "/".join(node.path) or "<root>"
                names = ["/".join((s.collection, *s.path[len(node.path) :])) for _, s, _ in own]
                if mod is None:
                    raise ValueError(_NO_TYPE.format(path=where, vars=names, cls=self.root_cls))
                if _is_flax_layer(type(mod)):
                    raise ValueError(
                        _NO_RULE.format(type=type(mod).__name__, path=where, vars=names)
                    )
                self.raw(own, prefix, type(mod).__name__, where)
            self.children(node, prefix, mod, node.children)

    def raw(self, own: list[tuple[str, Any, Any]], prefix: str, layer: str, where: str) -> None:
        """A layer without a rule: each own variable under its own name, unchanged."""
        names = [s.collection + "/" + name for name, s, _ in own]
        for name, _, _ in own:
            if name in FLAX_LAYOUT_NAMES:
                raise ValueError(
                    _NO_RULE.format(type=layer, path=where, vars=names)
                    + " "
                    + _FLAX_NAMED.format(name=name)
                )
        for name, slot, value in own:
            shape = tuple(value.shape)
            if _ambiguous(shape):
                where = "/".join((slot.collection, *slot.path))
                raise ValueError(_AMBIGUOUS.format(where=where, type=layer, shape=shape, name=name))
            part = Part(slot.collection, slot.path, IDENTITY, value)
            self.plan.add(prefix + name, (part,), layer=layer, raw=True)

    def registry_node(self, mod: Module, path: tuple[str, ...]) -> Node:
        """The tree of a registry module found below a plain flax module: a copy bound to its
        own part of the target, with every path and value put back in the whole target."""
        sub = {}
        for collection, tree in self.plan.target.items():
            node: Any = tree
            for part in path:
                node = node.get(part) if isinstance(node, Mapping) else None
            if isinstance(node, Mapping):
                sub[collection] = node
        local = build_tree(mod.clone(parent=None).bind(sub))
        return _rebase(local, path, self.plan.target)

    def identity(self, node: Node, prefix: str) -> None:
        layer = node.type_name
        added = getattr(type(node.module), "_added_in_version", {})
        for name, slot, value in node.parameters:
            self.plan.add(
                prefix + name, (Part(slot.collection, slot.path, IDENTITY, value),), 0, layer
            )
        for name, slot, value in node.buffers:
            if slot.persistent:
                part = Part(slot.collection, slot.path, IDENTITY, value)
                self.plan.add(prefix + name, (part,), 0, layer, added_in=added.get(name))
            else:
                self.plan.nonpersistent[prefix + name] = (slot.collection, slot.path)
        for name, child in node.children:
            self.visit(child, prefix + name + ".")

    def apply_rule(self, node: Node, prefix: str, mod: Any, rule: Rule) -> None:
        base = len(node.path)
        variables: dict[tuple[str, tuple[str, ...]], Any] = {}
        for _, slot, value in _subtree_slots(node):
            variables[(slot.collection, slot.path[base:])] = value
        tensors, extras = rule.expand(mod, variables)
        used: set[tuple[str, tuple[str, ...]]] = set()
        layer = type(mod).__name__
        for t in tensors:
            parts = []
            for p in t.parts:
                used.add((p.collection, p.path))
                leaf = variables[(p.collection, p.path)]
                parts.append(Part(p.collection, (*node.path, *p.path), p.layout, leaf))
            self.plan.add(prefix + t.torch, tuple(parts), t.axis, layer)
        for e in extras:
            if prefix + e.torch not in self.plan.extras:
                self.plan.extras[prefix + e.torch] = (e.value, e.reason)
                self.plan.order.append(prefix + e.torch)
        touched = {path[0] for _, path in used if len(path) > 1}
        leftover = [
            "/".join((c, *p))
            for c, p in variables
            if (c, p) not in used and (len(p) == 1 or p[0] in touched)
        ]
        if leftover:
            where = "/".join(node.path) or "<root>"
            raise ValueError(_LEFTOVER.format(type=layer, path=where, vars=leftover))
        rest = [(name, child) for name, child in node.children if name not in touched]
        self.children(node, prefix, mod, rest)

    def children(self, node: Node, prefix: str, mod: Any, children: list[tuple[str, Node]]) -> None:
        """Visit the child scopes of `node` in the order their modules were assigned (then
        called), each under its torch name; a submodule of another scope held by an attribute
        (a shared module) is visited too, under the attribute's name."""
        scopes = dict(children)
        ordered: list[tuple[str, Node]] = []
        seen: set[str] = set()
        if mod is not None and not isinstance(mod, Module):
            if mod.scope is not None:  # a bound module: make sure its setup() ran
                mod._try_setup()
            for torch_name, attribute, sub in _attribute_children(mod):
                if sub.name is None:
                    continue
                own = (*node.path, sub.name)
                path = tuple(sub.scope.path) if sub.scope is not None else own
                if path == own and sub.name in scopes and sub.name not in seen:
                    seen.add(sub.name)
                    self.records.setdefault(path, sub)
                    ordered.append((torch_name, scopes[sub.name]))
                elif path != own and path in self.nodes:  # shared with another parent
                    ordered.append((attribute, self.nodes[path]))
        called = [
            p[-1] for p in self.records if len(p) == len(node.path) + 1 and p[:-1] == node.path
        ]
        for name in [*called, *scopes]:  # compact layers: the order they were called in
            if name in scopes and name not in seen:
                seen.add(name)
                ordered.append((name, scopes[name]))
        for torch_name, child in ordered:
            self.visit(child, prefix + torch_name + ".")


def _rebase(node: Node, base: tuple[str, ...], target: Mapping[str, Any]) -> Node:
    """`node` (built from a module bound at `base`) with absolute paths and target leaves."""

    def moved(items: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
        out = []
        for name, slot, value in items:
            full = dataclasses.replace(slot, path=(*base, *slot.path))
            leaf: Any = target.get(full.collection)
            for part in full.path:
                leaf = leaf.get(part) if isinstance(leaf, Mapping) else None
            # absent: a non-persistent buffer the module recomputes (its fallback value)
            out.append((name, full, value if leaf is None else leaf))
        return out

    return Node(
        (*base, *node.path),
        node.module,
        node.type_name,
        moved(node.parameters),
        moved(node.buffers),
        [(name, _rebase(child, base, target)) for name, child in node.children],
    )


def _subtree_slots(node: Node) -> Iterator[tuple[str, Any, Any]]:
    yield from node.parameters
    yield from node.buffers
    for _, child in node.children:
        yield from _subtree_slots(child)


def make_plan(
    module: nn.Module,
    variables: Any = None,
    example_inputs: Any = None,
    rules: Mapping[type, Rule] | None = None,
    tied: Mapping[str, str] | None = None,
) -> Plan:
    """The conversion plan of `module` (unbound), from abstract shapes or `variables`."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a flax.linen.Module, got {type(module).__name__}")
    if module.scope is not None:
        raise TypeError(
            f"{type(module).__name__} is bound; pass the unbound module (module.unbind()[0])."
        )
    cls = type(module).__name__
    inputs = as_inputs(example_inputs)
    target, records = record_modules(module, inputs, variables)
    if not any(True for c in target.values() for _ in _leaves(c)):
        why = (
            "init without inputs created none (flax layers such as nn.Dense create their "
            "variables when first called, in __call__)"
            if variables is None
            else "the variables passed are empty"
        )
        raise ValueError(_EMPTY.format(cls=cls, why=why))
    plan = Plan(cls, target, records=records, inputs=inputs)
    root = build_tree(module.bind(target))
    _Walker(plan, root, records, rules).visit(root, "")
    for alias, canonical in (tied or {}).items():
        plan.tie(alias, canonical)
    covered = {(p.collection, p.path) for e in plan.entries.values() for p in e.parts}
    covered |= set(plan.nonpersistent.values())
    uncovered = [
        "/".join((c, *path))
        for c, tree in target.items()
        for path, _ in _leaves(tree)
        if (c, path) not in covered
    ]
    if uncovered:
        raise ValueError(
            f"{cls}: no torch key maps to flax variable(s) {uncovered}; their layers were "
            "not reached by the module walk. Report this with the model definition."
        )
    return plan


_COMPACT_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*_\d+$")  # flax's names in compact code: Dense_0


def _check_collections(module: nn.Module, variables: Any, shapes: Mapping[str, Any] | None) -> None:
    """Refuse a variables tree without its collection level (a bare params tree), which would
    otherwise fail far from the cause. With example inputs the collections are known; without,
    the top-level keys are compared with what a collection cannot be: a variable, a compact
    layer's scope name (`Dense_0`) or a submodule that `setup()` assigns."""
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"variables= must be a mapping of flax collections ({{'params': ...}}), got "
            f"{type(variables).__name__}."
        )
    keys = list(variables)
    inner = variables.get("params")
    if isinstance(inner, Mapping) and "params" in inner and "params" not in _setup_names(module):
        raise ValueError(_DOUBLE_WRAPPED.format(cls=type(module).__name__, keys=sorted(inner)))
    if not keys or "params" in keys:
        return
    what = ""
    if shapes is not None and "params" in shapes and not set(keys) <= set(shapes):
        what = f"not the collections {type(module).__name__}.init creates ({sorted(shapes)})"
    elif any(not isinstance(v, Mapping) for v in variables.values()):
        what = "variables themselves"
    elif any(_COMPACT_NAME.match(str(k)) for k in keys):
        what = "layer scope names"
    elif set(keys) & _setup_names(module):
        what = f"submodules of {type(module).__name__}"
    if what:
        raise ValueError(
            _BARE_PARAMS.format(cls=type(module).__name__, keys=sorted(map(str, keys)), what=what)
        )


def _setup_names(module: nn.Module) -> set[str]:
    """The scope names of the submodules `module.setup()` assigns (empty if setup needs
    variables to run)."""
    try:
        bound = module.bind({})
        bound._try_setup()
    except Exception:
        return set()
    return {sub.name for _, _, sub in _attribute_children(bound) if sub.name is not None}
