"""Mixed precision: a `Policy` of three dtypes (storage, compute, output) for the train step.

JAX has no autocast: the dtype of a computation is the dtype of its operands. A `Policy`
therefore casts at the model's boundary, as `jmp` does: `make_train_step(policy=...)` keeps
the master parameters (and so the optimizer state optax builds from them) in `param_dtype`,
hands the model floating parameters and inputs in `compute_dtype`, and casts its floating
outputs to `output_dtype`, where the loss is computed. Gradients flow back through the casts
to the master parameters in `param_dtype`. Buffers are never cast: BatchNorm's running
statistics stay float32 (`flax_registry.nn` computes batch statistics in float32 at least,
as PyTorch's kernels do), integer counters stay integers.

Differences from `torch.autocast`: the cast is per model call, not per operation, so every
operation of the model runs in `compute_dtype` (PyTorch keeps reductions, softmax and norms
in float32 through its op lists; `flax_registry.nn`'s normalisation layers do so themselves).
For float16, add a `GradScaler` to the state (`create_train_state(loss_scale=...)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._registry import PARAMS


def _is_float(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """`tree` with every floating array cast to `dtype` (integers, bools and non-arrays kept)."""
    return jax.tree.map(lambda x: x.astype(dtype) if _is_float(x) else x, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Storage, compute and output dtypes (hashable, so a step built with it is cached).

    - `param_dtype`: the master parameters and the optimizer state (float32);
    - `compute_dtype`: what the model computes in (bfloat16 or float16 for mixed precision);
    - `output_dtype`: what the model's outputs, hence the loss, are cast to (float32).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax_registry import train
        >>> policy = train.Policy(compute_dtype=jnp.bfloat16)
        >>> policy.cast_to_compute({"x": jnp.ones(2), "n": jnp.ones(2, jnp.int32)})["x"].dtype
        dtype(bfloat16)
    """

    param_dtype: Any = np.float32
    compute_dtype: Any = np.float32
    output_dtype: Any = np.float32

    def __post_init__(self) -> None:
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            dtype = jnp.dtype(getattr(self, field))
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"Policy.{field} must be a floating dtype, got {dtype}")
            object.__setattr__(self, field, dtype)

    def cast_to_param(self, variables: Any) -> Any:
        """The `params` collection of `variables` in `param_dtype` (buffers kept as they are);
        a tree without a `params` collection is cast whole."""
        if isinstance(variables, Mapping) and PARAMS in variables:
            return {**variables, PARAMS: cast_floating(variables[PARAMS], self.param_dtype)}
        return cast_floating(variables, self.param_dtype)

    def cast_to_compute(self, tree: Any) -> Any:
        """Floating arrays of `tree` in `compute_dtype` (the model's parameters and inputs)."""
        return cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        """Floating arrays of `tree` in `output_dtype` (the model's outputs)."""
        return cast_floating(tree, self.output_dtype)


def export_variables(variables: Mapping[str, Any], dtype: Any = None) -> dict[str, Any]:
    """The variables to hand to `flax_registry.to_torch`: as stored (the master dtype) when
    `dtype` is None, else every floating parameter and buffer in `dtype`, as PyTorch's
    `model.to(dtype)` casts them (integer buffers such as `num_batches_tracked` kept)."""
    if dtype is None:
        return dict(variables)
    return {c: cast_floating(tree, dtype) for c, tree in variables.items()}
