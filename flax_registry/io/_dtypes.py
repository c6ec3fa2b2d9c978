"""Dtype tables: safetensors dtype strings and PyTorch dtype/storage names -> NumPy dtypes.

bfloat16 and the float8 formats map to ``ml_dtypes`` types, so their bytes are kept exactly
(never routed through float32, unlike ``tensor.float().numpy()`` conversions).
"""

from __future__ import annotations

import sys
from typing import Literal

import ml_dtypes
import numpy as np


def _ml(name: str) -> np.dtype | None:
    """The ml_dtypes dtype ``name``, or None where this ml_dtypes version lacks it."""
    scalar = getattr(ml_dtypes, name, None)
    return None if scalar is None else np.dtype(scalar)


def _drop_none(table: dict[str, np.dtype | None]) -> dict[str, np.dtype]:
    return {k: v for k, v in table.items() if v is not None}


# The safetensors format's dtype names (no C128: the safetensors library refuses it).
SAFETENSORS_TO_NUMPY: dict[str, np.dtype] = _drop_none(
    {
        "F64": np.dtype(np.float64),
        "F32": np.dtype(np.float32),
        "F16": np.dtype(np.float16),
        "BF16": _ml("bfloat16"),
        "I64": np.dtype(np.int64),
        "I32": np.dtype(np.int32),
        "I16": np.dtype(np.int16),
        "I8": np.dtype(np.int8),
        "U64": np.dtype(np.uint64),
        "U32": np.dtype(np.uint32),
        "U16": np.dtype(np.uint16),
        "U8": np.dtype(np.uint8),
        "BOOL": np.dtype(np.bool_),
        "F8_E4M3": _ml("float8_e4m3fn"),
        "F8_E4M3FNUZ": _ml("float8_e4m3fnuz"),
        "F8_E5M2": _ml("float8_e5m2"),
        "F8_E5M2FNUZ": _ml("float8_e5m2fnuz"),
        "F8_E8M0": _ml("float8_e8m0fnu"),
        "C64": np.dtype(np.complex64),
    }
)

NUMPY_TO_SAFETENSORS: dict[np.dtype, str] = {v: k for k, v in SAFETENSORS_TO_NUMPY.items()}

# `torch.<Name>Storage` classes (what _rebuild_tensor_v2 checkpoints reference).
TORCH_STORAGE_TO_NUMPY: dict[str, np.dtype] = _drop_none(
    {
        "DoubleStorage": np.dtype(np.float64),
        "FloatStorage": np.dtype(np.float32),
        "HalfStorage": np.dtype(np.float16),
        "BFloat16Storage": _ml("bfloat16"),
        "LongStorage": np.dtype(np.int64),
        "IntStorage": np.dtype(np.int32),
        "ShortStorage": np.dtype(np.int16),
        "CharStorage": np.dtype(np.int8),
        "ByteStorage": np.dtype(np.uint8),
        "BoolStorage": np.dtype(np.bool_),
        "ComplexFloatStorage": np.dtype(np.complex64),
        "ComplexDoubleStorage": np.dtype(np.complex128),
    }
)

# `torch.<dtype>` globals (what _rebuild_tensor_v3 checkpoints reference), by the canonical names
# pickles use (as torch's weights-only allowlist: no aliases such as `torch.float`). None: a real
# torch dtype with no NumPy equivalent; it unpickles, and reading a tensor of it raises
# CheckpointError.
TORCH_DTYPE_TO_NUMPY: dict[str, np.dtype | None] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": _ml("bfloat16"),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": _ml("float8_e4m3fn"),
    "float8_e4m3fnuz": _ml("float8_e4m3fnuz"),
    "float8_e5m2": _ml("float8_e5m2"),
    "float8_e5m2fnuz": _ml("float8_e5m2fnuz"),
    "float8_e8m0fnu": _ml("float8_e8m0fnu"),
    "complex32": None,
    "float4_e2m1fn_x2": None,
    "quint8": None,
    "qint8": None,
    "qint32": None,
    "quint4x2": None,
    "quint2x4": None,
    "bits8": None,
    "bits16": None,
    "bits1x8": None,
    "bits2x4": None,
    "bits4x2": None,
}


def file_view_dtype(dtype: np.dtype, byteorder: str) -> np.dtype:
    """The dtype to view file bytes stored in ``byteorder`` (``'little'``/``'big'``) with.

    Where the file's byte order is the host's this is ``dtype`` itself. Otherwise NumPy's own
    dtypes take the foreign byte order directly; ml_dtypes types cannot (``'>V2'``), so multi-byte
    ones are viewed as foreign-order unsigned ints and re-viewed by :func:`to_native`.
    """
    if byteorder == sys.byteorder or dtype.itemsize == 1:
        return dtype
    order: Literal["<", ">"] = "<" if byteorder == "little" else ">"
    if dtype.isbuiltin == 1:  # 2: a user-defined (ml_dtypes) type
        return dtype.newbyteorder(order)
    return np.dtype(f"{order}u{dtype.itemsize}")


def to_native(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Convert an array viewed with :func:`file_view_dtype` to native-order ``dtype``."""
    if arr.dtype == dtype:
        return arr
    return arr.astype(arr.dtype.newbyteorder("=")).view(dtype)
