"""LazyTensor: a tensor in a checkpoint file, described by shape and dtype, read on demand."""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np


class _Source(Protocol):
    def read(self, key: str) -> np.ndarray: ...

    def read_slice(self, key: str, index: Any) -> np.ndarray: ...


class LazyTensor:
    """One tensor of an open checkpoint: ``shape``/``dtype``/``nbytes`` without reading data.

    ``np.asarray(t)`` reads the whole tensor; ``t[0:2, :]`` reads only the bytes of that slice.
    Unlike ``torch.load(..., mmap=True)`` tensors or ``safe_open(...).get_slice`` objects, no
    framework is involved: reads return NumPy arrays (bfloat16/float8 as ``ml_dtypes`` types),
    and the tensor stays valid only while its reader is open.
    """

    __slots__ = ("_source", "dtype", "key", "shape")

    def __init__(self, source: _Source, key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._source = source
        self.key = key
        self.shape = shape
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements (``torch.Tensor.numel``)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def read(self) -> np.ndarray:
        """The whole tensor as a fresh NumPy array."""
        return self._source.read(self.key)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self._source.read_slice(self.key, index)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self._source.read(self.key)
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyTensor({self.key!r}, shape={self.shape}, dtype={self.dtype})"
