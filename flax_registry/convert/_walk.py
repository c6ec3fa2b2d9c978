"""The conversion plan: every torch key of a flax model, the flax variables behind it, the layout.

`make_plan` walks the module tree (`flax_registry._tree.build_tree` over abstract variables) in
PyTorch's `state_dict` order. `flax_registry.Module`s map by identity (their registered names
are torch's); any other flax layer maps by the rule of its TYPE. Types come from the bound
modules themselves (setup-defined submodules), or, for compact modules whose layers exist only
inside `__call__`, from recording every module called while `init` runs under `jax.eval_shape`
on the example inputs (`flax.linen.intercept_methods`). Nothing is allocated.

Names: a flax submodule keeps its attribute name; list/tuple/dict attributes give torch's
container names (`layers_0` -> `layers.0`, `blocks_1_0` -> `blocks.1.0`, `heads_q` -> `heads.q`);
`nn.Sequential` children are `0`, `1`, ... as in `torch.nn.Sequential`; a layer created inside a
compact `__call__` keeps its flax name (`Dense_0`, or the `name=` it was given).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from .._tree import Node, build_tree
from ..module import Module, _modules_in
from ._layout import IDENTITY, Layout
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
    """One torch tensor: the concatenation along torch axis `axis` of its parts."""

    key: str
    parts: tuple[Part, ...]
    axis: int = 0

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
    _owners: dict[tuple[str, tuple[str, ...]], str] = dataclasses.field(default_factory=dict)

    def add(self, key: str, parts: tuple[Part, ...], axis: int = 0) -> None:
        ident = tuple((p.collection, p.path) for p in parts)
        if len(parts) == 1 and ident[0] in self._owners:  # a tied parameter: one variable
            self.aliases[key] = self._owners[ident[0]]
        else:
            self.entries[key] = Entry(key, parts, axis)
            for i in ident:
                self._owners.setdefault(i, key)
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
    module: nn.Module, example_inputs: tuple[Any, ...] | None, variables: Any
) -> tuple[dict[str, Any], dict[tuple[str, ...], nn.Module]]:
    """The target variables (abstract unless `variables` is given) and the module called at
    each scope path during `init` (empty without example inputs)."""
    records: dict[tuple[str, ...], nn.Module] = {}

    def interceptor(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        mod = context.module
        if mod.scope is not None:
            records.setdefault(tuple(mod.scope.path), mod)
        return next_fun(*args, **kwargs)

    key = jax.random.key(0)
    if example_inputs is not None:
        rngs = {"params": key, "dropout": key}
        with nn.intercept_methods(interceptor):
            shapes = jax.eval_shape(lambda: module.init(rngs, *example_inputs))
    elif variables is None:
        from .._apply import abstract_variables

        shapes = abstract_variables(module)
    target = variables if variables is not None else shapes
    return {c: v for c, v in dict(target).items() if c not in IGNORED_COLLECTIONS}, records


def _attribute_children(mod: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(torch name, submodule) of a module's attributes: lists/dicts give container names."""
    for attr, value in list(vars(mod).items()):
        if attr.startswith("_") or attr in ("parent", "scope", "name"):
            continue
        for name, child in _modules_in(value, attr):
            if isinstance(mod, nn.Sequential) and attr == "layers":
                name = name.removeprefix("layers.")
            yield name, child


class _Walker:
    def __init__(
        self,
        plan: Plan,
        records: dict[tuple[str, ...], nn.Module],
        rules: Mapping[type, Rule] | None,
    ) -> None:
        self.plan = plan
        self.records = records
        self.rules = rules
        self.root_cls = plan.cls

    def visit(self, node: Node, prefix: str) -> None:
        mod = node.module if node.module is not None else self.records.get(node.path)
        rule = find_rule(type(mod), self.rules) if mod is not None else None
        if rule is not None:
            self.apply_rule(node, prefix, mod, rule)
        elif isinstance(mod, Module):
            if node.module is None:  # reached through a plain flax parent: read its registry
                node = self.registry_node(mod, node.path)
            self.identity(node, prefix)
        else:
            own = [(s.collection, s.path) for _, s, _ in node.parameters + node.buffers]
            if own:
                where = "/".join(node.path) or "<root>"
                names = ["/".join((c, *p[len(node.path) :])) for c, p in own]
                if mod is None:
                    raise ValueError(_NO_TYPE.format(path=where, vars=names, cls=self.root_cls))
                raise ValueError(_NO_RULE.format(type=type(mod).__name__, path=where, vars=names))
            self.children(node, prefix, mod, node.children)

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
        for name, slot, value in node.parameters:
            self.plan.add(prefix + name, (Part(slot.collection, slot.path, IDENTITY, value),))
        for name, slot, value in node.buffers:
            if slot.persistent:
                self.plan.add(prefix + name, (Part(slot.collection, slot.path, IDENTITY, value),))
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
        for t in tensors:
            parts = []
            for p in t.parts:
                used.add((p.collection, p.path))
                leaf = variables[(p.collection, p.path)]
                parts.append(Part(p.collection, (*node.path, *p.path), p.layout, leaf))
            self.plan.add(prefix + t.torch, tuple(parts), t.axis)
        for e in extras:
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
            raise ValueError(_LEFTOVER.format(type=type(mod).__name__, path=where, vars=leftover))
        rest = [(name, child) for name, child in node.children if name not in touched]
        self.children(node, prefix, mod, rest)

    def children(self, node: Node, prefix: str, mod: Any, children: list[tuple[str, Node]]) -> None:
        names: dict[str, str] = {}
        if mod is not None and not isinstance(mod, Module):
            if mod.scope is not None:  # a bound module: make sure its setup() ran
                mod._try_setup()
            scopes = {name for name, _ in children}
            for torch_name, sub in _attribute_children(mod):
                if sub.name is not None and sub.name not in names:
                    names[sub.name] = torch_name
                    if sub.name in scopes:
                        self.records.setdefault((*node.path, sub.name), sub)
        rank = {name: i for i, name in enumerate(names)}
        for path in self.records:  # compact layers: the order they were called in
            if len(path) == len(node.path) + 1 and path[:-1] == node.path:
                rank.setdefault(path[-1], len(rank))
        ordered = sorted(children, key=lambda item: rank.get(item[0], len(rank)))
        for name, child in ordered:
            self.visit(child, prefix + names.get(name, name) + ".")


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
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    target, records = record_modules(module, example_inputs, variables)
    cls = type(module).__name__
    if not any(True for c in target.values() for _ in _leaves(c)):
        why = (
            "init without inputs created none (flax layers such as nn.Dense create their "
            "variables when first called, in __call__)"
            if variables is None
            else "the variables passed are empty"
        )
        raise ValueError(_EMPTY.format(cls=cls, why=why))
    plan = Plan(cls, target)
    root = build_tree(module.bind(target))
    _Walker(plan, records, rules).visit(root, "")
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
