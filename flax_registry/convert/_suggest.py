""" "Did you mean": the closest checkpoint key for each missing model key, and the `renames=`
pattern that would fix them, computed from the two key sets (never applied silently).

Two keys are paired by their longest common dotted suffix (`conv.weight` in
`encoder.stages.layers.0.conv.weight` and `encoder.stages.0.conv.weight`), then by equal
shapes. What differs is a prefix on each side; numbered components present on both sides
become a regex group, so one pattern covers every layer: `{r"^encoder\\.stages\\.(\\d+)\\.":
r"encoder.stages.layers.\\1."}`. A pattern is offered only with the number of missing keys it
would actually fix, checked by applying it to the checkpoint's keys.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence

Shape = tuple[int, ...]

_SHOWN = 8
_PAIRED = 64


def _common_suffix(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def closest(
    missing: str, candidates: Sequence[str], shapes: Mapping[str, Shape]
) -> tuple[str, int] | None:
    """The candidate sharing the longest dotted suffix with `missing` (at least the last
    component); ties go to equal shapes, then to the same layer numbers, then to the most
    similar string."""
    parts = missing.split(".")
    numbers = [p for p in parts if p.isdigit()]
    best: list[tuple[tuple[int, int, int], str, int]] = []
    for cand in candidates:
        cparts = cand.split(".")
        n = _common_suffix(parts, cparts)
        if n == 0:
            continue
        same_shape = int(shapes.get(cand) == shapes.get(missing))
        same_numbers = int(numbers == [p for p in cparts if p.isdigit()])
        score = (n, same_shape, same_numbers)
        if not best or score > best[0][0]:
            best = [(score, cand, n)]
        elif score == best[0][0]:
            best.append((score, cand, n))
    if not best:
        return None
    _, cand, n = max(best, key=lambda b: difflib.SequenceMatcher(None, missing, b[1]).ratio())
    return cand, n


def _pattern(source_prefix: list[str], target_prefix: list[str]) -> tuple[str, str]:
    """A regex over the checkpoint's prefix and its replacement. When both prefixes hold the
    same numbers in the same order (layer indices), each becomes a group."""
    src_numbers = [i for i, p in enumerate(source_prefix) if p.isdigit()]
    tgt_numbers = [i for i, p in enumerate(target_prefix) if p.isdigit()]
    grouped = len(src_numbers) == len(tgt_numbers) and all(
        source_prefix[i] == target_prefix[j] for i, j in zip(src_numbers, tgt_numbers)
    )
    regex = list(map(re.escape, source_prefix))
    repl = list(target_prefix)
    if grouped:
        for group, (i, j) in enumerate(zip(src_numbers, tgt_numbers), start=1):
            regex[i], repl[j] = r"(\d+)", f"\\{group}"
    if not source_prefix:
        return "^", ".".join(repl) + "."
    return "^" + r"\.".join(regex) + r"\.", ".".join(repl) + "." if repl else ""


def suggest(
    missing: Sequence[str],
    unexpected: Sequence[str],
    shapes: Mapping[str, Shape],
    matched: Sequence[str] = (),
) -> list[str]:
    """Message lines: the `renames=` patterns that fix the most missing keys, then each
    missing key's closest checkpoint key. A pattern is offered only if it renames none of
    the `matched` checkpoint keys (those that already load), made more specific (by the
    components after the prefix) until it does not."""
    if not missing or not unexpected:
        return []
    by_name: dict[str, list[str]] = {}
    for key in unexpected:
        by_name.setdefault(key.rpartition(".")[2], []).append(key)
    pairs: list[tuple[str, str, int]] = []
    for key in missing[:_PAIRED]:  # enough to find the patterns; each is counted over all
        found = closest(key, by_name.get(key.rpartition(".")[2], []), shapes)
        if found is not None:
            pairs.append((key, found[0], found[1]))
    if not pairs:
        return []
    closest_lines = ["Did you mean (closest checkpoint key for each missing key):"]
    for key, cand, _ in pairs[:_SHOWN]:
        note = ""
        a, b = shapes.get(key), shapes.get(cand)
        if a is not None and b is not None and a != b:
            note = f"  [shape {b} in the checkpoint, {a} in the model"
            if tuple(reversed(b)) == a:
                note += ": transposed, so its layer needs a rule with layout=LINEAR"
            note += "]"
        closest_lines.append(f'    "{key}" <- "{cand}"{note}')
    shown = min(len(pairs), _SHOWN)
    if len(missing) > shown:
        closest_lines.append(f"    ... ({len(missing) - shown} more missing keys)")
    missing_set = set(missing)
    patterns: dict[tuple[str, str], set[str]] = {}
    for key, cand, n in pairs:
        parts, cparts = key.split("."), cand.split(".")
        for extra in range(n):  # the shortest pattern that leaves loading keys alone
            pattern = _pattern(cparts[: len(cparts) - n + extra], parts[: len(parts) - n + extra])
            regex, repl = pattern
            try:
                if any(re.sub(regex, repl, k, count=1) != k for k in matched):
                    continue
                fixed = {re.sub(regex, repl, u, count=1) for u in unexpected} & missing_set
            except re.error:
                break
            patterns.setdefault(pattern, fixed)
            break
    ranked = sorted(((len(f), p, f) for p, f in patterns.items() if f), key=lambda t: -t[0])
    lines: list[str] = []
    covered: set[str] = set()
    for n, (regex, repl), fixed in ranked:
        if fixed <= covered or len(lines) == 3:
            continue
        covered |= fixed
        lines.append(
            f'renames={{r"{regex}": r"{repl}"}} would match {n} of the {len(missing)} missing keys.'
        )
    return lines + closest_lines
