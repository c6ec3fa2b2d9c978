"""Picking the state dict out of an unpickled PyTorch checkpoint.

``torch.load`` returns whatever object was saved; here the result must be a flat ``str ->
tensor`` mapping, so a training checkpoint such as ``{"state_dict": ..., "optimizer": ...,
"epoch": 3}`` needs ``entry="state_dict"`` (dotted for deeper levels: ``"model.state_dict"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ._errors import (
    BAD_ENTRY_PATH,
    NEEDS_ENTRY,
    NON_STR_KEY,
    NON_TENSOR_VALUE,
    NOT_A_DICT,
    CheckpointError,
    short_repr,
)
from ._unpickler import StoredTensor


def describe(x: object) -> str:
    """A short kind for listings: ``tensor float32 (3, 4)``, ``dict of 12 tensors``, ``int``."""
    if isinstance(x, StoredTensor):
        return f"tensor {x.dtype_name if x.dtype is None else x.dtype} {x.shape}"
    if isinstance(x, Mapping):
        n = sum(isinstance(v, StoredTensor) for v in x.values())
        if n == len(x):
            return f"dict of {n} tensors"
        return f"dict of {len(x)} entries, {n} tensors"
    if isinstance(x, list | tuple):
        return f"{type(x).__name__} of {len(x)}"
    return type(x).__name__


def _listing(d: Mapping[object, object], limit: int = 20) -> str:
    items = [f"{short_repr(k, 120)} ({describe(v)})" for k, v in list(d.items())[:limit]]
    if len(d) > limit:
        items.append(f"... {len(d) - limit} more")
    return ", ".join(items) or "nothing (empty dict)"


def _walk(obj: object, entry: str, path: Path) -> object:
    """Follow ``entry`` through nested dicts; keys may themselves contain dots."""
    parts = entry.split(".")
    current, i = obj, 0
    done: list[str] = []
    while i < len(parts):
        where = ".".join(done) or "the top level"
        if not isinstance(current, Mapping):
            raise CheckpointError(
                BAD_ENTRY_PATH.format(
                    path=path,
                    entry=entry,
                    problem=f"{where} is {describe(current)}, not a dict",
                    listing="nothing",
                )
            )
        for j in range(len(parts), i, -1):  # the longest key that matches wins
            candidate = ".".join(parts[i:j])
            if candidate in current:
                current, i = current[candidate], j
                done.append(candidate)
                break
        else:
            raise CheckpointError(
                BAD_ENTRY_PATH.format(
                    path=path,
                    entry=entry,
                    problem=f"{where} has no key {parts[i]!r}",
                    listing=_listing(current),
                )
            )
    return current


def select_state_dict(obj: object, entry: str | None, path: Path) -> dict[str, StoredTensor]:
    """The ``str -> tensor`` mapping at ``entry`` in ``obj`` (the top level when None)."""
    if entry is not None:
        obj = _walk(obj, entry, path)
    where = "" if entry is None else f" at entry={entry!r}"
    if not isinstance(obj, Mapping):
        raise CheckpointError(NOT_A_DICT.format(path=path, found=describe(obj) + where))
    if entry is None and not all(isinstance(v, StoredTensor) for v in obj.values()):
        counts = {
            k: sum(isinstance(x, StoredTensor) for x in v.values())
            for k, v in obj.items()
            if isinstance(v, Mapping)
        }
        best = max(counts, key=counts.__getitem__) if counts else next(iter(obj))
        raise CheckpointError(NEEDS_ENTRY.format(path=path, listing=_listing(obj), suggestion=best))
    out: dict[str, StoredTensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(NON_STR_KEY.format(path=path, where=where, key=short_repr(key)))
        if not isinstance(value, StoredTensor):
            raise CheckpointError(
                NON_TENSOR_VALUE.format(path=path, where=where, key=key, found=describe(value))
            )
        out[key] = value
    return out
