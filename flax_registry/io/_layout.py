"""Validation of tensor layouts read from files, shared by the safetensors and torch readers.

A file's header says where a tensor's elements are (shape, strides, an offset into a storage, or
byte offsets into a data region). Everything NumPy later does with those numbers (``np.empty``,
``as_strided``, ``reshape``) is checked here first, in Python integers, so that a crafted header
becomes a :class:`~flax_registry.io.CheckpointError` naming the tensor instead of an
``OverflowError``/``ValueError`` from NumPy, or a view of bytes that belong to another tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MAX_NDIM = 64
"""The most dimensions a NumPy array can have (``NPY_MAXDIMS``)."""

_MAX_BYTES = 2**63 - 1  # NumPy sizes and strides are intp


def shape_problem(shape: Sequence[int], itemsize: int) -> str | None:
    """Why NumPy cannot hold an array of ``shape`` with ``itemsize``-byte elements, or None.

    NumPy checks the product of the non-zero dimensions even for an empty array, so
    ``[0, 2**70]`` is refused although it holds no element (torch and safetensors refuse it
    too: their sizes are 64-bit).
    """
    if len(shape) > MAX_NDIM:
        return f"it has {len(shape)} dimensions, more than the {MAX_NDIM} NumPy supports"
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        return f"shape {list(shape)} is not a list of non-negative integers"
    nonzero = math.prod(d for d in shape if d)
    if nonzero * max(itemsize, 1) > _MAX_BYTES:
        return f"shape {list(shape)} of {itemsize}-byte elements spans more than 2**63 bytes"
    return None


def strided_problem(
    shape: Sequence[int],
    stride: Sequence[int],
    offset: int,
    itemsize: int,
    storage_bytes: int,
) -> str | None:
    """Why a tensor of ``shape`` and ``stride`` (in elements) at element ``offset`` does not lie
    inside a storage of ``storage_bytes`` bytes, or None. Mirrors ``Tensor.set_``'s bounds
    check: an empty tensor may have any offset; otherwise the last element must fit."""
    problem = shape_problem(shape, itemsize)
    if problem is not None:
        return problem
    if len(stride) != len(shape) or any(s < 0 for s in stride) or offset < 0:
        return f"size {list(shape)}, stride {list(stride)} and offset {offset} do not describe a tensor"
    if math.prod(shape) == 0:
        return None
    last = offset + sum((d - 1) * s for d, s in zip(shape, stride))
    needed = (last + 1) * itemsize
    if needed > storage_bytes:
        return (
            f"shape {tuple(shape)}, stride {tuple(stride)} and offset {offset} reach byte "
            f"{needed}, but the storage holds {storage_bytes} bytes"
        )
    return None


def byte_strides(shape: Sequence[int], stride: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """Strides in bytes for ``as_strided``; a dimension of size 0 or 1 is never stepped along,
    so its stride (which may be any number, e.g. 2**62) is replaced by 0."""
    return tuple(s * itemsize if d > 1 else 0 for d, s in zip(shape, stride))


def coverage_problem(spans: Sequence[tuple[str, int, int]], data_size: int) -> str | None:
    """Why byte ranges ``(key, begin, end)`` do not tile ``[0, data_size)`` exactly, or None.

    safetensors requires the tensors, sorted by offset, to follow each other without gap or
    overlap from byte 0 to the end of the file ("invalid offset for tensor", "incomplete
    metadata, file not fully covered"); a reader that skipped this check would return bytes
    shifted into another tensor.
    """
    position = 0
    for key, begin, end in sorted(spans, key=lambda s: (s[1], s[2])):
        if begin != position or end < begin:
            where = (
                "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            )
            if position == 0 and begin > 0:
                where = "does not start at byte 0 of the data"
            return f"invalid offset for tensor {key!r}: data_offsets [{begin}, {end}] {where}"
        position = end
    if position != data_size:
        return (
            f"incomplete metadata, file not fully covered: the tensors end at data byte "
            f"{position}, but the data region holds {data_size} bytes"
        )
    return None
