"""Names chosen by pattern: a str is a glob (`fnmatch`, so `*` also spans dots), a compiled
`re.Pattern` must match the whole name. Frozen parameters, parameter groups, sharding rules
and `init=` all choose PyTorch names this way."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Union

Pattern = Union[str, "re.Pattern[str]"]
Patterns = Pattern | Sequence[Pattern]


def as_patterns(patterns: Patterns | None) -> tuple[Pattern, ...]:
    """One pattern or several as a tuple (hashable)."""
    if patterns is None:
        return ()
    if isinstance(patterns, str | re.Pattern):
        return (patterns,)
    return tuple(patterns)


def matches(pattern: Pattern, names: Iterable[str]) -> bool:
    """Whether `pattern` matches any of `names`."""
    if isinstance(pattern, re.Pattern):
        return any(pattern.fullmatch(n) for n in names)
    if not isinstance(pattern, str):
        raise TypeError(
            f"a name pattern must be a str (glob) or a re.Pattern, got {type(pattern)!r}"
        )
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def matches_any(name: str, patterns: Sequence[Pattern]) -> bool:
    """Whether any of `patterns` matches `name`."""
    return any(matches(p, (name,)) for p in patterns)
