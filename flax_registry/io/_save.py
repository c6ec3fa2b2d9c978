"""Writing safetensors files, one tensor at a time, optionally sharded, always atomically.

Differs from ``safetensors.numpy.save_file`` / ``safetensors.torch.save_file``: the header is
planned from each tensor's ``shape``/``dtype`` and tensors are materialized and written one by
one (peak memory: the largest tensor, not the whole dict); bfloat16/float8 ``ml_dtypes`` arrays
and :class:`LazyTensor` values are accepted; ``max_shard_size`` writes the Hugging Face sharded
layout (``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``); files appear
under their final names only once complete (temp file + ``os.replace``), and an existing
sharded checkpoint is replaced as one step: a kill at any point leaves it entirely old or
entirely new (see :mod:`._commit`).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ._commit import clean_stale, commit_sharded, commit_single, directory_lock
from ._dtypes import NUMPY_TO_SAFETENSORS

BAD_KEY = "save_safetensors: tensor names must be str other than '__metadata__', found {key!r}."
BAD_DTYPE = (
    "save_safetensors: {key!r} has dtype {dtype}, which safetensors cannot store. Supported: "
    "{supported}. Fix: cast it (e.g. .astype(np.float32)) before saving."
)
BAD_METADATA = (
    "save_safetensors: metadata must map str to str (the safetensors format stores only "
    "strings), found {found}. Fix: json.dumps the values."
)
BAD_SIZE = (
    "save_safetensors: max_shard_size={size!r} is not a size. Expected a positive int (bytes) or "
    "a string like '5GB', '500MB', '2GiB'."
)
CHANGED = (
    "save_safetensors: {key!r} announced shape {shape} and dtype {dtype} but produced an array "
    "of shape {found_shape} and dtype {found_dtype}."
)

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from ``1000`` or ``"5GB"``/``"500MB"`` (powers of 10) or ``"2GiB"`` (powers of 2)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (
        m := re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B?)\s*", size.upper())
    ):
        try:
            value = int(float(m.group(1)) * _UNITS[m.group(2)])
        except (KeyError, ValueError):
            raise ValueError(BAD_SIZE.format(size=size)) from None
    else:
        raise ValueError(BAD_SIZE.format(size=size))
    if value <= 0:
        raise ValueError(BAD_SIZE.format(size=size))
    return value


def _native(dtype: np.dtype) -> np.dtype:
    """``dtype`` in host byte order (ml_dtypes types have no byte order to change)."""
    return dtype.newbyteorder("=") if dtype.isbuiltin == 1 else dtype


class _Planned(NamedTuple):
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    value: Any

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _plan(key: object, value: Any) -> _Planned:
    if not isinstance(key, str) or key == "__metadata__":
        raise ValueError(BAD_KEY.format(key=key))
    try:
        shape = tuple(int(d) for d in value.shape)
        dtype = np.dtype(value.dtype)
    except (AttributeError, TypeError):
        value = np.asarray(value)
        shape, dtype = value.shape, value.dtype
    if _native(dtype) not in NUMPY_TO_SAFETENSORS:
        supported = ", ".join(str(d) for d in NUMPY_TO_SAFETENSORS)
        raise ValueError(BAD_DTYPE.format(key=key, dtype=dtype, supported=supported))
    return _Planned(key, shape, dtype, value)


def _little_endian_bytes(p: _Planned) -> np.ndarray:
    """The tensor's bytes, C order, little-endian, as a flat uint8 array."""
    arr = np.asarray(p.value)
    if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
        arr = np.ascontiguousarray(arr)
    if arr.shape != p.shape or arr.dtype != p.dtype:
        raise ValueError(
            CHANGED.format(
                key=p.key,
                shape=p.shape,
                dtype=p.dtype,
                found_shape=arr.shape,
                found_dtype=arr.dtype,
            )
        )
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and np.little_endian is False):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.reshape(-1).view(np.uint8)


def _header(shard: list[_Planned], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for p in shard:
        dtype = NUMPY_TO_SAFETENSORS[_native(p.dtype)]
        header[p.key] = {
            "dtype": dtype,
            "shape": list(p.shape),
            "data_offsets": [offset, offset + p.nbytes],
        }
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def _write_temp(directory: Path, final_name: str, chunks: Any) -> Path:
    """Write ``chunks`` (an iterable of buffers) to a temp file in ``directory``; fsync it."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{final_name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                del chunk  # free this tensor's bytes before the next one is materialized
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _shard_chunks(shard: list[_Planned], metadata: Mapping[str, str] | None) -> Any:
    yield _header(shard, metadata)
    for p in shard:
        if p.nbytes:
            yield _little_endian_bytes(p)  # one tensor alive at a time


def _split(planned: list[_Planned], limit: int | None) -> list[list[_Planned]]:
    """Greedy, order-preserving split; a tensor larger than ``limit`` gets a shard of its own."""
    shards: list[list[_Planned]] = [[]]
    size = 0
    for p in planned:
        if limit is not None and shards[-1] and size + p.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def save_safetensors(
    tensors: Mapping[str, Any],
    path: str | PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    max_shard_size: int | str | None = None,
) -> list[Path]:
    """Write ``tensors`` (NumPy arrays, :class:`LazyTensor` s, anything with ``__array__``) as
    safetensors; return the paths written (shards first, then the index).

    ``path`` names the single file (``model.safetensors``; an existing directory means
    ``<dir>/model.safetensors``; ``<name>.index.json`` means ``<name>``). If ``max_shard_size`` is given and
    the tensors exceed it, shards ``model-0000i-of-0000n.safetensors`` and
    ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": ...}``)
    are written beside it instead; ``metadata`` goes into every shard's header and the index.
    Key order is preserved in the header, the data and the index (``safetensors`` sorts).
    """
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError(BAD_METADATA.format(found=repr(dict(metadata))[:200]))
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    planned = [_plan(k, v) for k, v in tensors.items()]
    target = Path(path)
    if target.is_dir():
        target = target / "model.safetensors"
    if target.name.endswith(".index.json"):
        target = target.with_name(target.name[: -len(".index.json")])
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    index_path = directory / f"{target.name}.index.json"
    with directory_lock(directory) as locked:
        if locked:
            clean_stale(target, index_path)
        return _write(planned, limit, metadata, target, index_path)


def _write(
    planned: list[_Planned],
    limit: int | None,
    metadata: Mapping[str, str] | None,
    target: Path,
    index_path: Path,
) -> list[Path]:
    directory = target.parent
    shards = _split(planned, limit)
    if len(shards) == 1:
        tmp = _write_temp(directory, target.name, _shard_chunks(shards[0], metadata))
        try:
            commit_single(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return [target]

    stem = (
        target.name[: -len(".safetensors")] if target.name.endswith(".safetensors") else target.name
    )
    names = [f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    def write_index(shard_names: Sequence[str]) -> Path:
        index = {
            "metadata": {**(metadata or {}), "total_size": sum(p.nbytes for p in planned)},
            "weight_map": {p.key: n for n, shard in zip(shard_names, shards) for p in shard},
        }
        text = json.dumps(index, indent=2, ensure_ascii=False) + "\n"
        return _write_temp(directory, index_path.name, [text.encode("utf-8")])

    temps: list[tuple[Path, str]] = []
    try:
        for name, shard in zip(names, shards):
            temps.append((_write_temp(directory, name, _shard_chunks(shard, metadata)), name))
        return commit_sharded(temps, index_path, write_index, target)
    finally:
        for tmp, _ in temps:  # renamed away on success; left over only after an error
            tmp.unlink(missing_ok=True)
