"""One lazy view over every kind of conversion source: a checkpoint path or an in-memory mapping.

`Source` gives keys (in the source's order), shapes and dtypes without reading data, and
`read` / `read_slice` that return NumPy arrays (bfloat16/float8 as `ml_dtypes`, never via
float32). Paths go through `flax_registry.io.open_checkpoint` (lazy, no torch, no code
execution); mappings may hold NumPy or JAX arrays, torch tensors or `LazyTensor`s.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .._arrays import is_torch_tensor, torch_to_numpy


class Source:
    """A checkpoint's tensors by name, read one at a time."""

    def __init__(self, mapping: Mapping[str, Any], name: str) -> None:
        self.mapping = mapping
        self.name = name
        self._reader = _reader_of(mapping)
        self.keys = list(mapping.keys())
        # torch's per-module state versions (`state_dict()._metadata`); None when unknown
        metadata = getattr(mapping, "_metadata", None)
        self.versions: Mapping[str, Any] | None = (
            metadata if isinstance(metadata, Mapping) else None
        )
        bad = [k for k in self.keys if not isinstance(k, str)]
        if bad:
            raise TypeError(
                f"{name}: state_dict keys must be str, found {bad[:5]!r}. Pass a flat "
                "mapping of dotted torch names to tensors."
            )

    def _array(self, key: str) -> Any:
        value = self.mapping[key]
        if is_torch_tensor(value):
            return torch_to_numpy(value)  # a view for CPU tensors: no copy
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            return value
        return np.asarray(value)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._reader is not None:
            return tuple(self._reader.shape(key))
        return tuple(int(d) for d in self._array(key).shape)

    def dtype(self, key: str) -> np.dtype:
        if self._reader is not None:
            return np.dtype(self._reader.dtype(key))
        return np.dtype(self._array(key).dtype)

    def read(self, key: str) -> np.ndarray:
        """The whole tensor (from a file: a fresh array; from a mapping: possibly a view)."""
        if self._reader is not None:
            return np.asarray(self._reader.read(key))
        return np.asarray(self._array(key))

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """`read(key)[index]` without copying: from a file, a read-only view of the mapped
        bytes (valid while the source is open; copy what you keep)."""
        if self._reader is not None:
            return self._reader.view(key)[index]
        value = self._array(key)
        if isinstance(value, np.ndarray):
            return value[index]
        return np.asarray(value[index])

    def version(self, module_prefix: str) -> int | None:
        """The `_version` torch recorded for the module at dotted `module_prefix`, if any."""
        info = self.versions.get(module_prefix) if self.versions is not None else None
        version = info.get("version") if isinstance(info, Mapping) else None
        return version if isinstance(version, int) else None

    def region(self, key: str) -> tuple[Any, ...] | None:
        """Where the tensor's elements live (address, shape, strides, dtype): two keys with
        the same region are one tensor stored twice under two names, as `torch.save` stores
        tied weights (one storage). None when unknown."""
        if self._reader is not None:
            view = self._reader.view(key)
        else:
            value = self.mapping[key]
            if is_torch_tensor(value):
                if value.device.type != "cpu":
                    return None
                address = value.untyped_storage().data_ptr()
                start = value.storage_offset() * value.element_size()
                return (
                    address + start,
                    tuple(value.shape),
                    tuple(value.stride()),
                    str(value.dtype),
                )
            if not isinstance(value, np.ndarray):
                return None
            view = value
        if view.size == 0:
            return None
        interface = view.__array_interface__
        return (interface["data"][0], view.shape, view.strides, str(view.dtype))

    def release(self) -> None:
        """Drop the pages earlier reads touched from this process's resident memory."""
        if self._reader is not None:
            self._reader.release()


def _reader_of(mapping: Mapping[str, Any]) -> Any:
    from ..io import CheckpointReader

    return mapping if isinstance(mapping, CheckpointReader) else None


@contextlib.contextmanager
def open_source(source: Any, entry: str | None = None) -> Iterator[Source]:
    """A `Source` for `source`; a checkpoint opened here is closed on exit."""
    if isinstance(source, str | os.PathLike):
        from ..io import open_checkpoint

        with open_checkpoint(source, entry=entry) as reader:
            yield Source(reader, str(source))
        return
    if not isinstance(source, Mapping):
        raise TypeError(
            f"source must be a mapping of names to arrays/tensors, or a checkpoint path, got "
            f"{type(source).__name__}. For a torch model pass model.state_dict()."
        )
    if entry is not None:
        raise ValueError("entry= applies to checkpoint files; index the mapping yourself.")
    yield Source(source, "state_dict")
