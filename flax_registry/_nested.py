"""Nested dicts (flax variables, collections, checkpoint items) and pytree key paths: the one
set of helpers every part of the library uses.

Paths are tuples of strings. `get` / `set_leaf` / `copy_dicts` / `leaves` work on plain nested
mappings (a leaf is anything that is not a mapping); `key_path` / `leaf_paths` on any pytree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax

KeyPath = tuple[str, ...]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def get(tree: Any, path: KeyPath, default: Any = MISSING) -> Any:
    """The value at `path`; `default` (or KeyError when none is given) if a part is absent."""
    node = tree
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            if default is MISSING:
                raise KeyError(path)
            return default
        node = node[part]
    return node


def set_leaf(tree: dict[str, Any], path: KeyPath, value: Any) -> None:
    """Set the value at `path`, creating the dicts on the way."""
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def copy_dicts(tree: Any) -> Any:
    """A copy of every mapping level as a plain dict; leaves are shared, not copied."""
    if isinstance(tree, Mapping):
        return {k: copy_dicts(v) for k, v in tree.items()}
    return tree


def leaves(tree: Mapping[str, Any], prefix: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    """`(path, leaf)` of every leaf of nested mappings, in their order."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def without(tree: Mapping[str, Any], paths: set[KeyPath], prefix: KeyPath = ()) -> dict[str, Any]:
    """A copy without the leaves at `paths` (and without the dicts that leaves empty)."""
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


def merge(tree: Mapping[str, Any], values: Mapping[KeyPath, Any]) -> dict[str, Any]:
    """A copy with `values` set at their paths."""
    out = copy_dicts(tree)
    for path, value in values.items():
        set_leaf(out, path, value)
    return out


def drop_abstract(tree: Any) -> Any:
    """A copy without `jax.ShapeDtypeStruct` leaves (nothing loaded there) and empty dicts."""
    if not isinstance(tree, Mapping):
        return None if isinstance(tree, jax.ShapeDtypeStruct) else tree
    out = {}
    for k, v in tree.items():
        kept = drop_abstract(v)
        if kept is not None and not (isinstance(kept, dict) and not kept):
            out[k] = kept
    return out


def is_abstract(tree: Any) -> bool:
    """Whether any leaf is a `jax.ShapeDtypeStruct`."""
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def key_path(path: Any) -> KeyPath:
    """A `jax.tree_util` key path as a tuple of strings (dict keys, attribute names, indices)."""
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        else:  # FlattenedIndexKey and friends
            parts.append(str(getattr(entry, "key", entry)))
    return tuple(parts)


def leaf_paths(tree: Any) -> dict[KeyPath, Any]:
    """`{path: leaf}` of a pytree, paths as tuples of strings."""
    return {key_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}
