"""The module walk behind `make_plan`: the torch keys of every module, by rule or by name.

Walks the module tree's torch view in PyTorch's `state_dict` order (see `_plan` for how
names and rules are chosen) and adds each torch key to the `Plan`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from .._frontend import Frontend
from .._node import Member, Node, all_slots
from ._entries import Part, Plan, StackGroup
from ._layout import IDENTITY
from ._rules import (
    AnyRule,
    Child,
    Rule,
    RuleError,
    Rules,
    Scanned,
    Stacked,
    describe,
    find_rule,
    rule_at,
)
from ._scan import walk_scanned

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
_LEFTOVER = (
    "the rule for {type} at flax scope '{path}' maps no torch key to flax variable(s) {vars}. "
    "Fix the rule (every variable of the layer needs a Map), or register a rule for {type}."
)


def _ambiguous(shape: tuple[int, ...]) -> bool:
    """Two axes of the same length (> 1): a transpose of the variable has its shape."""
    long = [d for d in shape if d > 1]
    return len(set(long)) < len(long)


_NO_CHILD = (
    "{rule} in the rule for {type} at flax scope '{path}' names flax child '{flax}', which the "
    "layer does not have; its children are {children}."
)
_CONSUMED_CHILD = (
    "{rule} in the rule for {type} at flax scope '{path}' renames child '{flax}', but the "
    "rule's own entries already map variables of that child ({vars}): map the child either "
    "by the rule's entries or by Child, not both."
)
_WRONG_LAYOUT = (
    "the rule for {type} at flax scope '{path}' (torch '{torch}'): {rule} gives torch key "
    "'{key}' from flax variable '{where}' of shape {shape}{sliced}, but {problem}. Fix the "
    "layout (its axis count must be the variable's).{scan_hint}"
)
_SCAN_HINT = (
    "If the layer is inside nn.scan / nnx.scan (its variables carry a leading layer axis), "
    "declare the scanned module: rules={'<its torch name>': Scanned()}."
)

_LOOKUP = object()  # visit: find the rule by path, then by type


class _Key(NamedTuple):
    """A torch key a rule gives, waiting to be added to the plan."""

    key: str
    parts: tuple[Part, ...]
    axis: int
    layer: str
    rule: str


def _torch_order(tensors: list[Any]) -> list[Any]:
    """A rule's tensors in PyTorch's `state_dict` order: each torch module's own tensors (in
    the rule's order), then its submodules' (in the order they first appear). A `Stacked`
    weight and bias over q/k/v become q.weight, q.bias, k.weight, ... as torch lists them."""
    root: dict[str, Any] = {"own": [], "sub": {}}
    for t in tensors:
        node = root
        for name in t.torch.split(".")[:-1]:
            node = node["sub"].setdefault(name, {"own": [], "sub": {}})
        node["own"].append(t)
    out: list[Any] = []

    def emit(node: dict[str, Any]) -> None:
        out.extend(node["own"])
        for sub in node["sub"].values():
            emit(sub)

    emit(root)
    return out


class Walker:
    """Adds the torch keys of a module tree to a plan, module by module."""

    def __init__(self, plan: Plan, frontend: Frontend, rules: Rules | None) -> None:
        self.plan = plan
        self.frontend = frontend
        self.rules = rules
        self.active: list[tuple[str, ...]] = []

    def fork(self, plan: Plan) -> Walker:
        """A walker with the same rules into another plan (a scanned module's one layer)."""
        return Walker(plan, self.frontend, self.rules)

    def rule_for(self, node: Node, prefix: str) -> AnyRule | None:
        found = rule_at(self.rules, prefix[:-1])
        if found is None and node.layer is not None:
            found = find_rule(type(node.layer), self.rules)
        return found

    def visit(self, node: Node, prefix: str, rule: Any = _LOOKUP) -> None:
        """Add the keys of `node` (torch name `prefix`, with its trailing dot) and its children:
        by `rule` when given (None: by name), else by the rule of its path or type."""
        if node.path in self.active:  # a module that holds one of its ancestors
            return
        self.active.append(node.path)
        try:
            chosen = self.rule_for(node, prefix) if rule is _LOOKUP else rule
            if isinstance(chosen, Scanned):
                walk_scanned(self, node, prefix, chosen)
            else:
                self._visit(node, prefix, chosen)
        finally:
            self.active.pop()

    def _visit(self, node: Node, prefix: str, rule: Rule | None) -> None:
        layer = node.layer
        if rule is not None:
            self.apply_rule(node, prefix, layer, rule)
        elif node.registry:
            self.identity(node, prefix)
        else:
            own = node.parameters + node.buffers
            if own:
                where = "/".join(node.path) or "<root>"
                names = ["/".join((s.collection, *s.path[len(node.path) :])) for _, s, _ in own]
                if layer is None:
                    raise ValueError(_NO_TYPE.format(path=where, vars=names, cls=self.plan.cls))
                if self.frontend.is_library_layer(layer):
                    raise ValueError(
                        _NO_RULE.format(type=type(layer).__name__, path=where, vars=names)
                    )
                self.raw(own, prefix, type(layer).__name__, where)
            self.children(node, prefix, set())

    def raw(self, own: list[Member], prefix: str, layer: str, where: str) -> None:
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
        self.children(node, prefix, set())

    def apply_rule(self, node: Node, prefix: str, layer: Any, rule: Rule) -> None:
        base = len(node.path)
        variables: dict[tuple[str, tuple[str, ...]], Any] = {}
        for _, slot, value in all_slots(node):
            variables[(slot.collection, slot.path[base:])] = value
        name = type(layer).__name__
        where = "/".join(node.path) or "<root>"
        try:
            tensors, extras = rule.expand(layer, variables)
        except RuleError as error:
            raise ValueError(
                f"the rule for {name} at flax scope '{where}' (torch '{prefix[:-1]}'): {error} "
                + _SCAN_HINT
            ) from None
        used: set[tuple[str, tuple[str, ...]]] = set()
        for t in tensors:
            for p in t.parts:
                used.add((p.collection, p.path))
        touched = {path[0] for _, path in used if len(path) > 1}
        renamed = self._renamed(node, rule, name, where, touched, used)
        visited = [
            (renamed[c.path[-1]].torch if c.path[-1] in renamed else torch_name)
            for torch_name, c in node.torch_children or ()
            if not (c.path[:-1] == node.path and c.path[-1] in touched)
        ]
        deferred: dict[str, list[_Key]] = {}
        for t in _torch_order(tensors):
            parts = []
            for p in t.parts:
                leaf = variables[(p.collection, p.path)]
                part = Part(p.collection, (*node.path, *p.path), p.layout, leaf, p.select)
                self._check_layout(part, t, node, prefix, name)
                parts.append(part)
            owner = max((c for c in visited if t.torch.startswith(c + ".")), key=len, default=None)
            key = _Key(prefix + t.torch, tuple(parts), t.axis, name, describe(t.origin))
            if owner is None:
                self.plan.add(key.key, key.parts, key.axis, key.layer, rule=key.rule)
            else:  # a variable moved up from a child: after the child's own keys, as in torch
                deferred.setdefault(owner, []).append(key)
        self._stack_groups(tensors, prefix)
        for e in extras:
            if prefix + e.torch not in self.plan.extras:
                self.plan.extras[prefix + e.torch] = (e.value, e.reason)
                self.plan.order.append(prefix + e.torch)
        leftover = [
            "/".join((c, *p))
            for c, p in variables
            if (c, p) not in used and (len(p) == 1 or p[0] in touched)
        ]
        if leftover:
            raise ValueError(_LEFTOVER.format(type=name, path=where, vars=leftover))
        self.children(node, prefix, touched, renamed, deferred)

    def _renamed(
        self,
        node: Node,
        rule: Rule,
        name: str,
        where: str,
        touched: set[str],
        used: set[tuple[str, tuple[str, ...]]],
    ) -> dict[str, Child]:
        """The rule's `Child` entries by flax child name, checked against the children."""
        own = {c.path[-1] for _, c in node.torch_children or () if c.path[:-1] == node.path}
        renamed: dict[str, Child] = {}
        for child in rule.children:
            if child.flax not in own:
                raise ValueError(
                    _NO_CHILD.format(
                        rule=describe(child),
                        type=name,
                        path=where,
                        flax=child.flax,
                        children=sorted(own),
                    )
                )
            if child.flax in touched:
                mapped = ["/".join((c, *p)) for c, p in used if p[0] == child.flax]
                raise ValueError(
                    _CONSUMED_CHILD.format(
                        rule=describe(child), type=name, path=where, flax=child.flax, vars=mapped
                    )
                )
            renamed[child.flax] = child
        return renamed

    def _check_layout(self, part: Part, t: Any, node: Node, prefix: str, name: str) -> None:
        """The layout fits the variable (its axis count), checked now, before any read."""
        try:
            part.torch_shape  # noqa: B018 - computes the torch shape, raising on a misfit
        except ValueError as error:
            sliced = f" (its slice {part.shape})" if part.select else ""
            scan_hint = " " + _SCAN_HINT if len(part.variable_shape) > 1 else ""
            raise ValueError(
                _WRONG_LAYOUT.format(
                    type=name,
                    path="/".join(node.path) or "<root>",
                    torch=prefix[:-1],
                    rule=describe(t.origin),
                    key=prefix + t.torch,
                    where=part.where,
                    shape=part.variable_shape,
                    sliced=sliced,
                    problem=error,
                    scan_hint=scan_hint,
                )
            ) from None

    def _stack_groups(self, tensors: list[Any], prefix: str) -> None:
        groups: dict[int, list[Any]] = {}
        for t in tensors:
            if isinstance(t.origin, Stacked):
                groups.setdefault(id(t.origin), []).append(t)
        for members in groups.values():
            part = members[0].parts[0]
            variable = "/".join((part.collection, *part.path))
            keys = tuple(prefix + t.torch for t in members)
            self.plan.stacks.append(
                StackGroup(describe(members[0].origin), prefix[:-1], variable, keys)
            )

    def children(
        self,
        node: Node,
        prefix: str,
        consumed: set[str],
        renamed: Mapping[str, Child] | None = None,
        deferred: Mapping[str, list[_Key]] | None = None,
    ) -> None:
        """Visit the torch-view children, except the child scopes a rule consumed; a child a
        `Child` entry names under its torch name (and its rule); then the keys a rule moved
        into that child."""
        for torch_name, child in node.torch_children or ():
            own_scope = child.path[:-1] == node.path
            if own_scope and child.path[-1] in consumed:
                continue
            entry = (renamed or {}).get(child.path[-1]) if own_scope else None
            if entry is None:
                self.visit(child, prefix + torch_name + ".")
            else:
                torch_name = entry.torch
                self.visit(
                    child, prefix + torch_name + ".", _LOOKUP if entry.rule is None else entry.rule
                )
            for k in (deferred or {}).get(torch_name, ()):
                self.plan.add(k.key, k.parts, k.axis, k.layer, rule=k.rule)
        for pending in (deferred or {}).values():  # a child not reached: keep the keys
            for k in pending:
                self.plan.add(k.key, k.parts, k.axis, k.layer, rule=k.rule)
