"""The module tree as PyTorch sees a module, and PyTorch's walks over it.

A front-end (the linen adapter, or the NNX one) reads a model into `Node`s: each module's own
parameters and buffers as `(name, Slot, value)` and its children, in PyTorch's order. The
walks here are `torch.nn.Module`'s algorithms (`named_modules` with `remove_duplicate`,
`_named_members`, `state_dict`'s order, `get_submodule`), written once over nodes and shared
by every front-end. A submodule reached under two names is one `Node` object, which is how
`named_modules` removes duplicates while `state_dict` lists every alias.

For conversion a front-end also fills the torch view: `layer` (the object whose type picks a
conversion rule), `registry` (its names are PyTorch's, set by register_parameter/buffer) and
`torch_children` (the children under the names the PyTorch twin gives them, shared modules
included under each parent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from ._registry import Slot

Member = tuple[str, Slot, Any]  # (local name, slot, value)


@dataclasses.dataclass(eq=False)
class Node:
    """One module: its own tensors and its children, in PyTorch's order."""

    path: tuple[str, ...]
    module: Any
    type_name: str
    parameters: list[Member] = dataclasses.field(default_factory=list)
    buffers: list[Member] = dataclasses.field(default_factory=list)
    children: list[tuple[str, Node]] = dataclasses.field(default_factory=list)
    # the torch view (filled for conversion only)
    layer: Any = None
    registry: bool = False
    torch_children: list[tuple[str, Node]] | None = None


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def named_modules(
    node: Node, memo: set[int] | None, prefix: str, remove_duplicate: bool
) -> Iterator[tuple[str, Node]]:
    """`torch.nn.Module.named_modules` over nodes."""
    if memo is None:
        memo = set()
    if id(node) not in memo:
        if remove_duplicate:
            memo.add(id(node))
        yield prefix, node
        for name, child in node.children:
            yield from named_modules(child, memo, join(prefix, name), remove_duplicate)


def named_members(
    node: Node, kind: str, prefix: str, recurse: bool, remove_duplicate: bool
) -> Iterator[tuple[str, Any]]:
    """`torch.nn.Module._named_members` over nodes (`kind`: "parameters" or "buffers")."""
    memo: set[Any] = set()
    modules = named_modules(node, None, prefix, remove_duplicate) if recurse else [(prefix, node)]
    for module_prefix, module in modules:
        for name, slot, value in getattr(module, kind):
            if slot.ident in memo:
                continue
            if remove_duplicate:
                memo.add(slot.ident)
            yield join(module_prefix, name), value


def state_entries(node: Node, prefix: str = "") -> Iterator[Member]:
    """(key, slot, value) of every `state_dict` entry, with every alias, in PyTorch's order."""
    for name, slot, value in node.parameters:
        yield prefix + name, slot, value
    for name, slot, value in node.buffers:
        if slot.persistent:
            yield prefix + name, slot, value
    for name, child in node.children:
        yield from state_entries(child, prefix + name + ".")


def all_slots(node: Node) -> Iterator[Member]:
    """Every tensor of the subtree (parameters and buffers, persistent or not)."""
    yield from node.parameters
    yield from node.buffers
    for _, child in node.children:
        yield from all_slots(child)


def get_node(node: Node, target: str) -> Node:
    """`torch.nn.Module.get_submodule` over nodes, with its messages."""
    if target == "":
        return node
    current, rest = node, target
    while rest:
        # A child of a list attribute has a dotted local name ("heads.1"): longest match wins.
        match = max(
            (name for name, _ in current.children if rest == name or rest.startswith(name + ".")),
            key=len,
            default=None,
        )
        if match is None:
            raise AttributeError(f"{current.type_name} has no attribute `{rest.split('.')[0]}`")
        current = dict(current.children)[match]
        rest = rest[len(match) + 1 :]
    return current


def get_member(node: Node, target: str, kind: str, what: str) -> Any:
    """`torch.nn.Module.get_parameter` / `get_buffer` over nodes, with their messages."""
    module_path, _, name = target.rpartition(".")
    owner = get_node(node, module_path)
    for member, _, value in getattr(owner, kind):
        if member == name:
            return value
    known = [n for n, _, _ in owner.parameters + owner.buffers] + [n for n, _ in owner.children]
    if name not in known and not (owner.module is not None and hasattr(owner.module, name)):
        raise AttributeError(f"{owner.type_name} has no attribute `{name}`")
    raise AttributeError(f"`{name}` is not {what}")


def added_later(node: Node, metadata: Mapping[str, Any] | None, prefix: str = "") -> Iterator[str]:
    """Keys of buffers that a state dict may lack, as PyTorch's `_load_from_state_dict` lets
    it: a module's `_added_in_version` buffers, when the state dict records no version for
    the module (`_metadata`, which `torch.nn.Module.state_dict()` writes) or an older one."""
    added = getattr(type(node.module), "_added_in_version", None) if node.module else None
    if added:
        info = metadata.get(prefix[:-1], {}) if metadata is not None else {}
        version = info.get("version") if isinstance(info, Mapping) else None
        for name, since in added.items():
            if version is None or version < since:
                yield prefix + name
    for name, child in node.children:
        yield from added_later(child, metadata, prefix + name + ".")
