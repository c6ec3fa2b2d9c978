"""Nested-dict helpers: drop the non-persistent buffers before saving, put them back after."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def without(
    tree: Mapping[str, Any], paths: set[tuple[str, ...]], prefix: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A copy of nested dicts without the leaves at `paths` (and without emptied dicts)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = (*prefix, key)
        if isinstance(value, Mapping):
            sub = without(value, paths, path)
            if sub:
                out[key] = sub
        elif path not in paths:
            out[key] = value
    return out


def merge(tree: Mapping[str, Any], leaves: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """A copy of nested dicts with `leaves` set at their paths."""
    out = {k: merge(v, {}) if isinstance(v, Mapping) else v for k, v in tree.items()}
    for path, value in leaves.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out
