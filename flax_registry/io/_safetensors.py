"""Reading safetensors files: validate the header first, then memory-map tensors on demand.

Differs from ``safetensors.safe_open(..., framework="numpy")``: bfloat16 and float8 tensors load
as ``ml_dtypes`` arrays (the numpy backend rejects them), slices of any dtype read only their
bytes, and every header problem is a :class:`CheckpointError` naming the file.

A header is accepted only where the safetensors library accepts it: its JSON as strict as
serde's (no ``NaN``, no lone surrogate escapes, no nesting beyond what the format needs),
``__metadata__`` absent, null or str to str, and the tensors' byte ranges tiling the data
region exactly, from its first byte to the end of the file (see
:func:`._layout.coverage_problem`). Shapes are checked against what NumPy can hold
(:func:`._layout.shape_problem`). Stricter than safetensors: a duplicated key is refused
(safetensors keeps the last), and so are more than 64 dimensions.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._dtypes import SAFETENSORS_TO_NUMPY, file_view_dtype
from ._errors import (
    ST_BAD_DTYPE,
    ST_BAD_ENTRY,
    ST_BAD_JSON,
    ST_BAD_LAYOUT,
    ST_BAD_METADATA,
    ST_HEADER_LIMIT,
    ST_HEADER_TOO_LARGE,
    ST_TOO_SMALL,
    ST_TRUNCATED,
    CheckpointError,
    describe_error,
    missing_key_message,
    short_repr,
)
from ._fast_read import read_whole
from ._layout import coverage_problem, shape_problem
from ._mapped import Extent, MappedFile, copy_out, native_view, normalize_index, typed_view

HEADER_LIMIT = 100_000_000
"""The largest JSON header the safetensors format accepts (the Rust library's limit)."""


@dataclass(frozen=True, slots=True)
class _Entry:
    shape: tuple[int, ...]
    dtype: np.dtype
    begin: int
    end: int


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unencodable_string(tree: object) -> str | None:
    """The first string (key or value) in the parsed JSON that is not valid Unicode (a lone
    surrogate from a ``\\ud800`` escape, which serde refuses), or None."""
    pending = [tree]
    while pending:
        node = pending.pop()
        items: list[object] = []
        if isinstance(node, dict):
            items = [*node.keys(), *node.values()]
        elif isinstance(node, list):
            items = node
        for x in items:
            if isinstance(x, str):
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    return x
            elif isinstance(x, dict | list):
                pending.append(x)
    return None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(path: Path, key: str, raw: object) -> _Entry:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(ST_BAD_ENTRY.format(path=path, key=key, problem=problem))

    if not isinstance(raw, dict):
        raise bad(f"expected a JSON object, found {type(raw).__name__}")
    name = raw.get("dtype")
    shape = raw.get("shape")
    offsets = raw.get("data_offsets")
    if not isinstance(name, str):
        raise bad(f"'dtype' is {short_repr(name)}")
    if name not in SAFETENSORS_TO_NUMPY:
        supported = ", ".join(SAFETENSORS_TO_NUMPY)
        raise CheckpointError(
            ST_BAD_DTYPE.format(path=path, key=key, dtype=name, supported=supported)
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"'shape' is {short_repr(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"'data_offsets' is {short_repr(offsets)}")
    dtype = SAFETENSORS_TO_NUMPY[name]
    problem = shape_problem(shape, dtype.itemsize)
    if problem is not None:
        raise bad(problem)
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise bad(
            f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but shape {shape} of "
            f"{name} needs {expected}"
        )
    return _Entry(tuple(shape), dtype, offsets[0], offsets[1])


def read_header(path: Path, size: int) -> tuple[int, dict[str, _Entry], dict[str, str]]:
    """Parse and validate the header: ``(data_start, entries in file order, metadata)``.

    Reads only the header bytes; checks that every tensor lies inside the file.
    """
    if size < 8:
        raise CheckpointError(ST_TOO_SMALL.format(path=path, size=size))
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > HEADER_LIMIT:
            raise CheckpointError(ST_HEADER_LIMIT.format(path=path, n=n, limit=HEADER_LIMIT))
        if n > size - 8:
            raise CheckpointError(ST_HEADER_TOO_LARGE.format(path=path, n=n, size=size))
        header_bytes = f.read(n)
    try:
        header = json.loads(
            header_bytes.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_refuse_constant,
        )
    except RecursionError:
        raise CheckpointError(ST_BAD_JSON.format(path=path, error="nested too deeply")) from None
    except (UnicodeDecodeError, ValueError) as e:
        error = describe_error(e).removeprefix("JSONDecodeError: ").removeprefix("ValueError: ")
        raise CheckpointError(ST_BAD_JSON.format(path=path, error=error)) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            ST_BAD_JSON.format(path=path, error=f"the header is a {type(header).__name__}")
        )
    bad_string = _unencodable_string(header)
    if bad_string is not None:
        raise CheckpointError(
            ST_BAD_JSON.format(
                path=path, error=f"the string {short_repr(bad_string)} is not valid Unicode"
            )
        )
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(ST_BAD_METADATA.format(path=path, found=short_repr(metadata)))
    entries = {key: _parse_entry(path, key, raw) for key, raw in header.items()}
    data_start = 8 + n
    data_end = max((e.end for e in entries.values()), default=0)
    if data_start + data_end > size:
        raise CheckpointError(
            ST_TRUNCATED.format(path=path, expected=data_end, found=size - data_start)
        )
    problem = coverage_problem(
        [(key, e.begin, e.end) for key, e in entries.items()], size - data_start
    )
    if problem is not None:
        raise CheckpointError(ST_BAD_LAYOUT.format(path=path, problem=problem))
    return data_start, entries, metadata


class SafetensorsFile:
    """One open safetensors file (the :class:`TensorFile` backend for ``.safetensors``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map = MappedFile(path)
        self._data_start, self._entries, self.metadata = read_header(path, self._map.size)

    def keys(self) -> list[str]:
        return list(self._entries)

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(missing_key_message(key, self.path, self._entries)) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def dtype(self, key: str) -> np.dtype:
        return self._entry(key).dtype

    def _view(self, entry: _Entry) -> np.ndarray:
        raw = self._map.bytes_at(self._data_start + entry.begin, entry.end - entry.begin)
        return typed_view(raw, file_view_dtype(entry.dtype, "little"), entry.shape)

    def extent(self, key: str) -> Extent:
        entry = self._entry(key)
        return Extent(self._map, self._data_start + entry.begin, entry.shape, entry.dtype, "little")

    def read(self, key: str) -> np.ndarray:
        """The whole tensor, read straight from the file into a fresh array (one copy)."""
        return read_whole(self.extent(key))

    def read_slice(self, key: str, index: Any) -> np.ndarray:
        entry = self._entry(key)
        return copy_out(self._view(entry), entry.dtype, normalize_index(index))

    def view(self, key: str) -> np.ndarray:
        entry = self._entry(key)
        return native_view(self._view(entry), entry.dtype)

    def release(self) -> None:
        self._map.release()

    def close(self) -> None:
        self._map.close()
