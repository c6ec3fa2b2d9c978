"""Array conversion at the boundary: torch tensors and numpy arrays in, without importing torch."""

from __future__ import annotations

import sys
from typing import Any

import jax
import ml_dtypes
import numpy as np

# torch dtypes numpy cannot hold natively: read their bits through a same-width integer view.
_BIT_VIEWS = {
    "bfloat16": ("int16", ml_dtypes.bfloat16),
    "float8_e4m3fn": ("uint8", ml_dtypes.float8_e4m3fn),
    "float8_e5m2": ("uint8", ml_dtypes.float8_e5m2),
}


def is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def torch_to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor as numpy, bit-exact: bf16 and fp8 become `ml_dtypes` arrays, never float32."""
    torch = sys.modules["torch"]
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name in _BIT_VIEWS:
        int_name, np_dtype = _BIT_VIEWS[name]
        return t.contiguous().view(getattr(torch, int_name)).numpy().view(np_dtype)
    return t.numpy()


def to_array(x: Any) -> Any:
    """A JAX or numpy array for `x` (JAX arrays pass through; torch tensors are converted)."""
    if isinstance(x, jax.Array | np.ndarray):
        return x
    if is_torch_tensor(x):
        return torch_to_numpy(x)
    return np.asarray(x)


def numpy_to_torch(array: np.ndarray) -> Any:
    """A torch tensor with `array`'s bits: bf16 and fp8 through a same-width integer view
    (the inverse of `torch_to_numpy`); imports torch."""
    import torch

    if not array.flags.writeable:
        array = array.copy()
    name = array.dtype.name
    if name in _BIT_VIEWS:
        int_name, _ = _BIT_VIEWS[name]
        return torch.from_numpy(array.view(int_name)).view(getattr(torch, name))
    return torch.from_numpy(array)


def default_prng_impl() -> str:
    """The name of JAX's default PRNG implementation (`jax_default_prng_impl`)."""
    return str(jax.random.key_impl(jax.random.key(0)))
