"""Putting written files in place so that a checkpoint changes in one step, whatever is killed.

A single file is replaced with one ``os.replace``. A sharded checkpoint is several files, and
its index is the only thing readers start from, so the index is the commit point: it is
replaced last and only ever names shards that are complete. Shards the *current* index names
are never overwritten in place. When the new shards' standard names
(``model-0000i-of-0000n.safetensors``) are free, they are renamed there and the index is
replaced; when the current index names them (an overwrite with the same shard count), the
new shards are first committed under staged names (``model-0000i-of-0000n.staged-<token>
.safetensors``), then hard-linked to the standard names, and a second index replacement
switches to those. At every instant the index names a complete, consistent set of shards:
a kill leaves the checkpoint entirely old or entirely new, never mixed.

Files left behind by a killed save (temporary files, and shards of the save's naming scheme
that the index does not name: staged ones, or those of the replaced checkpoint) are removed by
the next save of the same name. Saves into one
directory are serialized with ``flock`` on the directory; where the filesystem has no such
lock, nothing is cleaned up (another process might be writing those files).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".tmp"
_TEMP = re.compile(r"^\..+\.(safetensors|json)\.[^.]+\.tmp$")


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[bool]:
    """An exclusive ``flock`` on ``directory`` for the duration; yields whether it was taken."""
    if fcntl is None:
        yield False
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def index_shards(index: Path) -> set[str] | None:
    """The shard file names an existing index names (plain names only); None if there is no
    index, or it cannot be parsed (then every file is treated as possibly in use)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8-sig"))["weight_map"]
        names = {str(v) for v in weight_map.values()}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    return {n for n in names if n and "/" not in n and "\\" not in n and n not in (".", "..")}


def clean_stale(target: Path, index: Path) -> None:
    """Remove what killed saves of ``target`` left in its directory: temporary files, and shard
    files of its naming scheme (``<stem>-0000i-of-0000n[.staged-<token>].safetensors``) that
    ``index`` does not name. Call with the directory lock held; nothing is removed when the
    index cannot be parsed (then it is unknown which shards are in use)."""
    in_use = index_shards(index)
    if in_use is None:
        return
    stem = target.name.removesuffix(".safetensors")
    shard = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}(\.staged-[0-9a-f]+)?\.safetensors")
    for entry in os.scandir(target.parent):
        name = entry.name
        stale = _TEMP.match(name) or (shard.fullmatch(name) and name not in in_use)
        if stale and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _unlink_all(directory: Path, names: set[str]) -> None:
    for name in sorted(names):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(directory / name)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a file with ``src``'s content (a hard link where possible), atomically."""
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def commit_single(tmp: Path, target: Path) -> None:
    """Put one complete file in place; an older sharded checkpoint of the same name (its index
    and shards) is removed after, so the directory never resolves to a mix."""
    directory = target.parent
    index = target.with_name(target.name + ".index.json")
    old = index_shards(index)
    os.replace(tmp, target)
    fsync_directory(directory)
    if old is not None and index.exists():
        os.unlink(index)
        _unlink_all(directory, old - {target.name})


def commit_sharded(
    shards: Sequence[tuple[Path, str]],
    index: Path,
    write_index: Callable[[Sequence[str]], Path],
    target: Path,
) -> list[Path]:
    """Put complete shard files (``(temp file, standard name)``) and their index in place, as
    one step for readers (see the module docstring). ``write_index(names)`` writes a complete
    index naming ``names`` to a temporary file and returns it. Returns the final paths."""
    directory = index.parent
    old = index_shards(index)
    names = [name for _, name in shards]
    in_use = set(names) if old is None else old & set(names)
    if not in_use:  # the standard names are free: rename there, then the index
        for tmp, name in shards:
            os.replace(tmp, directory / name)
    else:  # stage, commit, link to the standard names, commit again
        token = secrets.token_hex(4)
        staged = [name.replace(".safetensors", f".staged-{token}.safetensors") for name in names]
        for (tmp, _), name in zip(shards, staged):
            os.replace(tmp, directory / name)
        fsync_directory(directory)
        os.replace(write_index(staged), index)
        fsync_directory(directory)
        for stage, name in zip(staged, names):
            _link_or_copy(directory / stage, directory / name)
    fsync_directory(directory)
    os.replace(write_index(names), index)
    fsync_directory(directory)
    if in_use:
        _unlink_all(directory, set(staged))
    stale = (old or set()) - set(names)
    if target.name not in names and target.is_file():
        stale.add(target.name)  # a single-file checkpoint of the same name, now superseded
    _unlink_all(directory, stale)
    return [*(directory / n for n in names), index]
