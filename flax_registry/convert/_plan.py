"""The conversion plan: every torch key of a Flax model, the variables behind it, the layout.

`make_plan` walks the module tree's torch view (read by the module's front-end over abstract
variables, once) in PyTorch's `state_dict` order. Registry modules (`flax_registry.Module`)
map by identity (their registered names are torch's); any other layer maps by the rule of
its TYPE. Types come from the front-end: bound setup-defined submodules, or, for compact
modules whose layers exist only inside `__call__`, the layers recorded while `init` ran on
the example inputs under `jax.eval_shape`. Nothing is allocated.

Names come from the torch view (see `flax_registry._linen.tree`): attribute names with torch's
container names (`layers_0` -> `layers.0`), an explicit `name=` kept (`[Layer(name=str(i))
...]` under `layer` is `layer.0`, as in the PyTorch twin), compact layers under their flax
names, and a module shared by two parents under each (one variable, aliased keys).

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

from collections.abc import Mapping
from typing import Any

from .. import _nested
from .._frontend import frontend_of
from .._inputs import as_inputs
from ._entries import Entry as Entry
from ._entries import Part as Part
from ._entries import Plan as Plan
from ._rules import Rules
from ._walk import Walker

IGNORED_COLLECTIONS = ("intermediates", "cache", "losses")
"""Collections that are not module state (sown values, decoding caches): never converted."""

_EMPTY = (
    "{cls} has no variables to convert: {why}. Pass example_inputs=(x,) (the inputs "
    "{cls}.init needs) or variables= (an abstract or concrete variables tree)."
)


def make_plan(
    module: Any,
    variables: Any = None,
    example_inputs: Any = None,
    rules: Rules | None = None,
    tied: Mapping[str, str] | None = None,
) -> Plan:
    """The conversion plan of `module` (unbound), from abstract shapes or `variables`."""
    frontend = frontend_of(module)
    error = frontend.bound_error(module)
    if error:
        raise TypeError(error)
    cls = frontend.display_name(module)
    inputs = as_inputs(example_inputs)
    shapes: dict[str, Any] | None = None
    records: Any = {}
    if frontend.holds_state and variables is None:
        variables = frontend.variables_of(module)  # abstract for an `nnx.eval_shape` model
    elif inputs is not None:
        shapes, records = frontend.record_layers(module, inputs)
    else:
        records = frontend.remembered(module)
    if variables is not None:
        frontend.check_variables(module, variables, shapes)
        target = dict(variables)
    elif shapes is not None:
        target = shapes
    else:
        target = dict(frontend.abstract_variables(module))
    target = {c: v for c, v in target.items() if c not in IGNORED_COLLECTIONS}
    if not any(True for c in target.values() for _ in _nested.leaves(c)):
        why = (
            "init without inputs created none (flax layers such as nn.Dense create their "
            "variables when first called, in __call__)"
            if variables is None
            else "the variables passed are empty"
        )
        raise ValueError(_EMPTY.format(cls=cls, why=why))
    plan = Plan(cls, target, frontend=frontend, inputs=inputs)
    root = frontend.tree(module, target, records=records, torch_view=True)
    Walker(plan, frontend, rules).visit(root, "")
    for alias, canonical in (tied or {}).items():
        plan.tie(alias, canonical)
    covered = {(p.collection, p.path) for e in plan.entries.values() for p in e.parts}
    covered |= set(plan.nonpersistent.values())
    uncovered = [
        "/".join((c, *path))
        for c, tree in target.items()
        for path, _ in _nested.leaves(tree)
        if (c, path) not in covered
    ]
    if uncovered:
        raise ValueError(
            f"{cls}: no torch key maps to flax variable(s) {uncovered}; their layers were "
            "not reached by the module walk. Report this with the model definition."
        )
    _check_slices(plan)
    return plan


_OVERLAP = (
    "{cls}: torch keys '{a}' ({rule_a}) and '{b}' ({rule_b}) both fill flax variable "
    "'{where}' {shape} at the same place (indices {fa} and {fb} of its axes). Each part of "
    "a stacked variable must come from one key: check the rules' axes and names."
)


def _check_slices(plan: Plan) -> None:
    """Keys that fill slices of one variable never fill the same place twice."""
    slices: dict[tuple[str, tuple[str, ...]], list[tuple[str, Part]]] = {}
    for key, e in plan.entries.items():
        for p in e.parts:
            slices.setdefault((p.collection, p.path), []).append((key, p))
    for members in slices.values():
        if len(members) < 2 or not any(p.select for _, p in members):
            continue
        seen: dict[tuple[tuple[int, int], ...], tuple[str, Part]] = {}
        for key, p in members:
            fixed = p.fixed()
            overlap = next(
                (
                    (k, q)
                    for k, q in seen.values()
                    if all(q.fixed().get(a, i) == i for a, i in fixed.items())
                    and all(fixed.get(a, i) == i for a, i in q.fixed().items())
                ),
                None,
            )
            if overlap is not None:
                k, q = overlap
                raise ValueError(
                    _OVERLAP.format(
                        cls=plan.cls,
                        a=k,
                        b=key,
                        rule_a=plan.entries[k].rule,
                        rule_b=plan.entries[key].rule,
                        where=p.where,
                        shape=p.variable_shape,
                        fa=q.fixed(),
                        fb=fixed,
                    )
                )
            seen[tuple(sorted(fixed.items()))] = (key, p)
