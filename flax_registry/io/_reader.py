"""open_checkpoint / CheckpointReader: one read-only mapping over any supported checkpoint.

The format is detected from the file's first bytes, not its extension; sharded checkpoints
(``*.index.json``) open every shard's header up front (cheap: no tensor data is read), so
shapes, dtypes and missing shards are known before the first read.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from .._gc_pause import collection_paused
from ._errors import (
    CLOSED,
    DIR_AMBIGUOUS,
    DIR_NO_CHECKPOINT,
    EMPTY_FILE,
    ENTRY_NOT_APPLICABLE,
    HTML_PAGE,
    INDEX_BAD_FORMAT,
    INDEX_BAD_JSON,
    INDEX_KEY_NOT_IN_SHARD,
    INDEX_MISSING_SHARD,
    LEGACY_TORCH,
    LFS_POINTER,
    NOT_FOUND,
    UNKNOWN_FORMAT,
    CheckpointError,
    describe_error,
    missing_key_message,
    short_repr,
)
from ._lazy import LazyTensor
from ._mapped import Extent, TensorFile
from ._safetensors import SafetensorsFile
from ._torch_zip import TorchZipFile

PREFERRED_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
"""Looked up, in this order, when ``open_checkpoint`` is given a directory."""

_CANDIDATE_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth")

Kind = Literal["safetensors", "zip", "json"]


def _sniff(path: Path) -> Kind:
    """The file's format from its first bytes (extensions only break ties for broken files)."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(EMPTY_FILE.format(path=path))
    with open(path, "rb") as f:
        head = f.read(64)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # A JSON file's first 8 bytes are printable; a safetensors length with 8 printable bytes
    # would exceed the 100 MB header limit, so the two never collide.
    if text.startswith(b"{") and all(32 <= b < 127 or b in b"\t\r\n" for b in head[:8]):
        return "json"
    if head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise CheckpointError(LEGACY_TORCH.format(path=path))  # a bare pickle (PROTO opcode)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(LFS_POINTER.format(path=path))
    if text[:14].lower().startswith((b"<!doctype html", b"<html")):
        raise CheckpointError(HTML_PAGE.format(path=path))
    if path.name.endswith(".safetensors"):
        return "safetensors"  # lets the header parser name the problem
    if path.name.endswith(".json"):
        return "json"
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return "zip"  # lets zipfile name the problem (truncated / not a zip archive)
    raise CheckpointError(UNKNOWN_FORMAT.format(path=path, head=head[:16]))


def _resolve_directory(path: Path) -> Path:
    for name in PREFERRED_NAMES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(
        p for p in path.iterdir() if p.is_file() and p.name.endswith(_CANDIDATE_SUFFIXES)
    )
    indexes = [p for p in candidates if p.name.endswith(".index.json")]
    if len(indexes) == 1:
        return indexes[0]
    if len(candidates) == 1:
        return candidates[0]
    expected = ", ".join(PREFERRED_NAMES)
    if not candidates:
        raise CheckpointError(DIR_NO_CHECKPOINT.format(path=path, expected=expected))
    found = ", ".join(p.name for p in candidates)
    raise CheckpointError(DIR_AMBIGUOUS.format(path=path, found=found, expected=expected))


def _open_file(path: Path, entry: str | None, kind: Kind | None = None) -> TensorFile:
    kind = kind or _sniff(path)
    if kind == "zip":
        return TorchZipFile(path, entry=entry)
    if kind == "safetensors":
        if entry is not None:
            raise CheckpointError(
                ENTRY_NOT_APPLICABLE.format(path=path, entry=entry, kind="safetensors file")
            )
        return SafetensorsFile(path)
    raise CheckpointError(
        INDEX_BAD_FORMAT.format(path=path, problem="a shard is itself an index file")
    )


def _load_index(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    try:
        index = json.loads(path.read_text(encoding="utf-8-sig"))
    except RecursionError:
        raise CheckpointError(INDEX_BAD_JSON.format(path=path, error="nested too deeply")) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(INDEX_BAD_JSON.format(path=path, error=describe_error(e))) from None

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(INDEX_BAD_FORMAT.format(path=path, problem=problem))

    if not isinstance(index, dict) or "weight_map" not in index:
        raise bad("no 'weight_map' object at the top level")
    weight_map, metadata = index["weight_map"], index.get("metadata") or {}
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise bad("'weight_map' must map tensor names (str) to shard file names (str)")
    if not isinstance(metadata, dict):
        raise bad(f"'metadata' is a {type(metadata).__name__}, expected an object")
    for shard in set(weight_map.values()):
        if "\x00" in shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise bad(f"shard {short_repr(shard)} is not a file name inside the index's directory")
    return weight_map, metadata


def _is_shard_file(index: Path, name: str) -> bool:
    """Whether shard ``name`` of ``index`` is a file; a name the OS cannot look up (longer than
    NAME_MAX, ...) is a malformed index, not an OSError."""
    try:
        return (index.parent / name).is_file()
    except (OSError, ValueError) as e:
        raise CheckpointError(
            INDEX_BAD_FORMAT.format(
                path=index,
                problem=f"shard {short_repr(name)} is not a usable file name ({describe_error(e)})",
            )
        ) from None


def _str_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


class CheckpointReader(Mapping[str, LazyTensor]):
    """A read-only ``Mapping[str, LazyTensor]`` over a checkpoint, in file order.

    Unlike ``torch.load`` / ``safetensors.torch.load_file`` nothing is loaded when it opens:
    ``reader[key]`` is a :class:`LazyTensor`; ``read(key)`` and ``read_slice(key, index)``
    return fresh NumPy arrays (bfloat16/float8 as ``ml_dtypes``) holding only what was asked
    for. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        path: Path,
        files: list[TensorFile],
        owners: dict[str, TensorFile],
        *,
        format: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
        self.format = format
        self._files = files
        self._owners = owners
        self._metadata = dict(metadata or {})
        self._closed = False

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` (or an index's ``metadata``); ``{}`` for torch files."""
        return dict(self._metadata)

    def _owner(self, key: str) -> TensorFile:
        if self._closed:
            raise CheckpointError(CLOSED.format(path=self.path))
        try:
            return self._owners[key]
        except (KeyError, TypeError):
            raise KeyError(missing_key_message(key, self.path, self._owners)) from None

    def __getitem__(self, key: str) -> LazyTensor:
        owner = self._owner(key)
        return LazyTensor(self, key, owner.shape(key), owner.dtype(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._owners)

    def __len__(self) -> int:
        return len(self._owners)

    def __contains__(self, key: object) -> bool:
        return key in self._owners

    def shape(self, key: str) -> tuple[int, ...]:
        return self._owner(key).shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._owner(key).dtype(key)

    def nbytes(self, key: str) -> int:
        owner = self._owner(key)
        return math.prod(owner.shape(key)) * owner.dtype(key).itemsize

    def read(self, key: str) -> np.ndarray:
        """The whole tensor as a fresh array in its stored dtype (never via float32)."""
        return self._owner(key).read(key)

    def read_slice(self, key: str, index: Any) -> np.ndarray:
        """``read(key)[index]``, reading only the bytes the index selects (basic indexing)."""
        return self._owner(key).read_slice(key, index)

    def view(self, key: str) -> np.ndarray:
        """A read-only, zero-copy view of the tensor in the memory-mapped file (a copy only when
        the file's byte order is not the machine's). Unlike `read`, it is not checksummed and
        is valid only until `close()`: copy what you keep. Index it to touch only some pages."""
        return self._owner(key).view(key)

    def extent(self, key: str) -> Extent | None:
        """Where the tensor's bytes lie in its file when they are C-contiguous (None for a
        strided or compressed tensor): what `flax_registry.io.read_rows` reads from, straight
        into memory the caller owns, one range of rows at a time (several threads may)."""
        return self._owner(key).extent(key)

    def release(self) -> None:
        """Drop the pages earlier reads and views touched from this process's resident memory
        (they stay in the OS page cache). Streaming conversions call it after each tensor, so
        their peak memory is the output plus what is in flight, not the whole checkpoint."""
        for f in self._files:
            f.release()

    def close(self) -> None:
        """Unmap every file. Arrays returned earlier stay valid; LazyTensors do not."""
        self._closed = True
        for f in self._files:
            f.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} tensors"
        return f"CheckpointReader({str(self.path)!r}, {self.format}, {state})"


def _open_index(path: Path) -> CheckpointReader:
    weight_map, metadata = _load_index(path)
    with contextlib.ExitStack() as stack:
        shards: dict[str, TensorFile] = {}
        for name in dict.fromkeys(weight_map.values()):
            shard_path = path.parent / name
            if not _is_shard_file(path, name):
                raise CheckpointError(
                    INDEX_MISSING_SHARD.format(path=path, shard=name, shard_path=shard_path)
                )
            shards[name] = _open_file(shard_path, None)
            stack.callback(shards[name].close)
        shard_keys = {name: set(f.keys()) for name, f in shards.items()}
        for key, name in weight_map.items():
            if key not in shard_keys[name]:
                raise CheckpointError(
                    INDEX_KEY_NOT_IN_SHARD.format(
                        path=path, key=key, shard=name, count=len(shard_keys[name])
                    )
                )
        owners = {key: shards[name] for key, name in weight_map.items()}
        kinds = {type(f).__name__ for f in shards.values()}
        fmt = "safetensors-index" if kinds <= {"SafetensorsFile"} else "torch-index"
        reader = CheckpointReader(
            path, list(shards.values()), owners, format=fmt, metadata=_str_metadata(metadata)
        )
        stack.pop_all()
    return reader


@collection_paused()
def open_checkpoint(path: str | PathLike[str], *, entry: str | None = None) -> CheckpointReader:
    """Open a checkpoint for lazy, read-only access by tensor name.

    ``path``: a ``.safetensors`` file, a sharded ``*.index.json`` (safetensors or torch
    ``.bin`` shards), a ``torch.save`` zip checkpoint (any extension), or a directory holding
    one (``model.safetensors.index.json``, ``model.safetensors``,
    ``pytorch_model.bin.index.json``, ``pytorch_model.bin`` are preferred, in that order).
    ``entry``: for torch checkpoints that nest the state dict (``{"state_dict": ...,
    "epoch": 3}``), the key to use, dotted for deeper levels (``"model.state_dict"``).

    Differs from ``torch.load``: no torch, no code execution (an allowlist unpickler), nothing
    read until asked, and every malformed file raises :class:`CheckpointError`.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(NOT_FOUND.format(path=p))
    if p.is_dir():
        p = _resolve_directory(p)
    kind = _sniff(p)
    if kind == "json":
        if entry is not None:
            raise CheckpointError(
                ENTRY_NOT_APPLICABLE.format(path=p, entry=entry, kind="sharded checkpoint index")
            )
        return _open_index(p)
    f = _open_file(p, entry, kind)
    metadata = f.metadata if isinstance(f, SafetensorsFile) else {}
    fmt = "safetensors" if isinstance(f, SafetensorsFile) else "torch"
    return CheckpointReader(p, [f], dict.fromkeys(f.keys(), f), format=fmt, metadata=metadata)
