"""Checks of stacked and scanned variables against a checkpoint, before any tensor is read.

A `Stacked` rule needs its keys to share one shape, and a `Scanned` module every one of its
layers: when the checkpoint does not fit, PyTorch's error lines (missing keys, size
mismatches) say which keys, and the hints here say which rule, with the shapes and the fix.
A variable that several keys fill loads whole or not at all (`incomplete`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

from .. import _messages as messages
from ._entries import Plan, ScanGroup
from ._report import LoadReport
from ._source import Source

_STACK_SHAPES = (
    "{rule} at torch '{where}' stacks {keys} into flax variable '{variable}' {shape}, so each "
    "must be {expected}, but the checkpoint has {found}.{fix}"
)
_STACK_DIFFER = (
    " Keys of different shapes cannot share a stacked axis: stack only keys of one shape "
    "(with grouped-query attention, map q on its own and stack k and v: Map('q_proj.weight', "
    "'q/kernel', ...), Stacked(('k_proj.weight', 'v_proj.weight'), 'kv/kernel', ...))."
)
_SCAN_GAPS = (
    "{rule} at torch '{prefix}' holds {n} layers, but the checkpoint has no layer "
    "{gaps} (no key under {names}); it has layers {present}. A scanned variable "
    "loads every layer from the checkpoint: provide the missing layers, or build the flax "
    "model with as many layers as the checkpoint has."
)
_SCAN_EXTRA = (
    "{rule} at torch '{prefix}' holds {n} layers, but the checkpoint has layers up to {top} "
    "(unexpected keys under {names}): build the flax scan with {count} layers."
)
_SCAN_PARTS = (
    "{rule} at torch '{prefix}': layer {i} lacks {missing} while the other layers have them."
)
_INCOMPLETE = (
    "flax variable '{where}' {shape} is one array filled by {n} torch keys ({rule}), and {m} "
    "of them do not load: {keys}. A stacked or scanned variable loads whole, from every one "
    "of its keys: provide them (or fix the rule), or load a model whose variable holds only "
    "what the checkpoint has."
)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out: list[str] = []
    for i in indices:
        if out and int(out[-1].rpartition("-")[2]) == i - 1:
            out[-1] = f"{out[-1].partition('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out) or "none"


def explain(plan: Plan, src: Source, report: LoadReport, chosen: Mapping[str, list[str]]) -> None:
    """Add to `report.hints` what each stacked or scanned rule needs and the checkpoint lacks."""
    mismatched = {key for key, _, _ in report.shape_mismatches}
    for g in plan.stacks:
        found = {k: src.shape(chosen[k][0]) for k in g.keys if k in chosen}
        expected = plan.entries[g.keys[0]].torch_shape
        if not any(k in mismatched for k in g.keys):
            continue
        shape = plan.entries[g.keys[0]].parts[0].variable_shape
        report.hints.append(
            _STACK_SHAPES.format(
                rule=g.rule,
                where=g.where or "<root>",
                keys=list(g.keys),
                variable=g.variable,
                shape=shape,
                expected=expected,
                found=", ".join(f"{k} {s}" for k, s in found.items()),
                fix=_STACK_DIFFER if len(set(found.values())) > 1 else "",
            )
        )
    missing = set(report.missing)
    for s in plan.scans:
        _scan_hints(s, missing, report)


def _scan_hints(s: ScanGroup, missing: set[str], report: LoadReport) -> None:
    gone = [i for i, keys in enumerate(s.layers) if keys and all(k in missing for k in keys)]
    n = len(s.layers)
    if gone and len(gone) < n:
        present = [i for i in range(n) if i not in gone]
        names = messages.quoted([s.name(i) + "." for i in gone[:3]])
        report.hints.append(
            _SCAN_GAPS.format(
                rule=s.rule,
                prefix=s.prefix,
                n=n,
                gaps=_ranges(gone),
                names=names,
                present=_ranges(present),
            )
        )
    for i, keys in enumerate(s.layers):
        lacking = [k for k in keys if k in missing]
        if lacking and i not in gone and len(gone) < n:
            report.hints.append(
                _SCAN_PARTS.format(rule=s.rule, prefix=s.prefix, i=i, missing=lacking[:4])
            )
    if len(gone) == n:
        return
    head, _, tail = s.name("\0").partition("\0")
    pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"\.")
    extra = sorted(
        {
            int(m.group(1))
            for k in report.unexpected
            if (m := pattern.match(k)) and int(m.group(1)) >= n
        }
    )
    if extra:
        report.hints.append(
            _SCAN_EXTRA.format(
                rule=s.rule,
                prefix=s.prefix,
                n=n,
                top=extra[-1],
                names=messages.quoted([s.name(i) + "." for i in extra[:3]]),
                count=extra[-1] + 1,
            )
        )


def incomplete(
    plan: Plan, skipped: Collection[str], why: Mapping[str, str], hints: Sequence[str] = ()
) -> None:
    """Raise when some but not all keys of a variable that several keys fill are `skipped`
    (missing, mismatched, `init=` or defaulted): it can only load whole. `hints` (those of
    `explain`) follow the message."""
    by_variable: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    selected: set[tuple[str, tuple[str, ...]]] = set()
    for key, e in plan.entries.items():
        for p in e.parts:
            by_variable.setdefault((p.collection, p.path), []).append(key)
            if p.select:
                selected.add((p.collection, p.path))
    scan_of = {k: f"{s.rule} at '{s.prefix}'" for s in plan.scans for ks in s.layers for k in ks}
    for ident, keys in by_variable.items():  # in state_dict order: the same message each run
        if ident not in selected:
            continue
        left = [k for k in keys if k in skipped]
        if left and len(left) < len(keys):
            e = plan.entries[keys[0]]
            raise ValueError(
                "\n".join(
                    dict.fromkeys(
                        [
                            _INCOMPLETE.format(
                                where="/".join((ident[0], *ident[1])),
                                shape=e.parts[0].variable_shape,
                                n=len(keys),
                                rule=scan_of.get(keys[0], e.rule or "stacked"),
                                m=len(left),
                                keys=[f"{k} ({why.get(k, 'missing')})" for k in left[:6]],
                            ),
                            *hints,
                        ]
                    )
                )
            )
