"""The dtype policy of a conversion: which dtype each tensor is loaded as."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DtypePolicy = Any  # None | "checkpoint" | dtype | {collection: dtype} | callable


def _is_float(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _as_dtype(value: Any) -> np.dtype | None:
    try:
        return np.dtype(value)
    except (TypeError, ValueError):
        return None


def resolve_dtype(
    policy: DtypePolicy, key: str, collection: str, source: np.dtype, model: np.dtype
) -> np.dtype:
    """The dtype a tensor is loaded as.

    `None`: the model's dtype (the target variable's). `"checkpoint"`: the checkpoint's dtype.
    A dtype: floating tensors become it, others keep the model's. `{collection: dtype}`: per
    collection (e.g. `{"params": jnp.bfloat16}`), others keep the model's. A callable
    `(key, checkpoint dtype, model dtype) -> dtype | None`.
    """
    floating = _is_float(source) and _is_float(model)
    result: Any = model
    if policy is None:
        pass
    elif isinstance(policy, str) and policy == "checkpoint":
        result = source
    elif isinstance(policy, Mapping):
        chosen = policy.get(collection)
        if chosen is not None and floating:
            result = np.dtype(chosen)
    elif callable(policy) and not isinstance(policy, type):
        result = policy(key, source, model) or model
    elif _as_dtype(policy) is not None:
        result = np.dtype(policy) if floating else model
    else:
        raise TypeError(
            f"dtype= must be None, 'checkpoint', a dtype, a mapping or a callable, got {policy!r}"
        )
    return np.dtype(jax.dtypes.canonicalize_dtype(result))  # 64-bit types need jax_enable_x64
