"""`Embedding`: torch.nn.Embedding's lookup table, `weight` of shape `(num_embeddings, dim)`.

As torch: `weight ~ N(0, 1)` with the `padding_idx` row zeroed at init; the output at
positions holding `padding_idx` passes no gradient to that row (so it stays as trained, or
zero); `scale_grad_by_freq` divides each row's gradient by the index's count in the batch;
`max_norm` renormalises the looked-up rows whose `norm_type`-norm exceeds `max_norm`.

Differences from torch: with `max_norm`, torch rewrites the referenced rows of `weight` in
place during the forward pass; here the weight is not modified (parameters are immutable
inputs) and only the output uses the renormalised rows, with torch's gradient (that of a
lookup into the renormalised table). Out-of-range indices raise torch's `IndexError` only
when the indices are concrete (under `jax.jit` they cannot be checked; JAX then returns NaN
rows). `sparse` is accepted and has no effect (JAX gradients are dense). No `device`;
`dtype` is the weight dtype. torch's `_weight` / `_freeze` are replaced by `from_pretrained`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._linen.module import Module
from .._parameter import Parameter
from . import _init

Array = jax.Array


class Embedding(Module):
    """`torch.nn.Embedding(num_embeddings, embedding_dim, padding_idx=None, max_norm=None,
    norm_type=2.0, scale_grad_by_freq=False, sparse=False)`; see the module docstring."""

    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None = None
    max_norm: float | None = None
    norm_type: float = 2.0
    scale_grad_by_freq: bool = False
    sparse: bool = False
    dtype: Any = None
    pretrained: Any = None  # from_pretrained's table (a numpy array), else None
    freeze: bool = False

    def __post_init__(self) -> None:
        if self.padding_idx is not None and not (
            -self.num_embeddings <= self.padding_idx < self.num_embeddings
        ):
            raise AssertionError("Padding_idx must be within num_embeddings")
        super().__post_init__()

    @property
    def _padding_row(self) -> int | None:
        if self.padding_idx is None:
            return None
        return self.padding_idx % self.num_embeddings

    def setup(self) -> None:
        shape = (self.num_embeddings, self.embedding_dim)
        if self.pretrained is not None:
            table = np.asarray(self.pretrained)
            weight = Parameter(table, dtype=self.dtype, trainable=not self.freeze)
            self.register_parameter("weight", weight)
            return
        row = self._padding_row

        def init(key: Any, shape: Any, dtype: Any) -> Array:
            table = _init.normal()(key, shape, dtype)
            return table if row is None else table.at[row].set(0)

        self.register_parameter("weight", Parameter(init, shape, self.dtype))

    @classmethod
    def from_pretrained(
        cls,
        embeddings: Any,
        freeze: bool = True,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
    ) -> Embedding:
        """`torch.nn.Embedding.from_pretrained`: the table starts as `embeddings` (its padding
        row is kept, as torch keeps it); `freeze=True` makes the weight non-trainable
        (`Parameter(trainable=False)`, torch's `requires_grad=False`)."""
        from .._arrays import to_array

        table = np.asarray(to_array(embeddings))
        if table.ndim != 2:
            raise AssertionError("Embeddings parameter is expected to be 2-dimensional")
        return cls(
            int(table.shape[0]),
            int(table.shape[1]),
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            sparse=sparse,
            pretrained=_Frozen(table),
            freeze=freeze,
        )

    def __call__(self, input: Any) -> Array:
        indices = jnp.asarray(input)
        if not jnp.issubdtype(indices.dtype, jnp.integer):
            raise RuntimeError(
                "Expected tensor for argument #1 'indices' to have one of the following scalar "
                f"types: Long, Int; but got {indices.dtype} instead (while checking arguments "
                "for embedding)"
            )
        _check_range(input, self.num_embeddings)
        out = jnp.take(self.weight, indices, axis=0)
        if self.max_norm is not None:
            norms = jnp.linalg.norm(out, ord=self.norm_type, axis=-1, keepdims=True)
            scale = jnp.where(norms > self.max_norm, self.max_norm / (norms + 1e-7), 1.0)
            out = out + jax.lax.stop_gradient(out * scale - out)
        if self.scale_grad_by_freq:
            counts = jnp.zeros(self.num_embeddings, out.dtype).at[indices].add(1)
            inverse = (1.0 / counts[indices])[..., None]
            out = jax.lax.stop_gradient(out) + (
                out * inverse - jax.lax.stop_gradient(out * inverse)
            )
        row = self._padding_row
        if row is not None:
            out = jnp.where((indices == row)[..., None], jax.lax.stop_gradient(out), out)
        return out


def _check_range(indices: Any, size: int) -> None:
    """torch's IndexError, when the indices are concrete (not traced)."""
    if isinstance(indices, jax.core.Tracer):
        return
    values = np.asarray(indices)
    if values.size and (values.min() < 0 or values.max() >= size):
        raise IndexError(
            f"index out of range in self (Embedding with num_embeddings={size} got indices "
            f"in [{values.min()}, {values.max()}])"
        )


class _Frozen:
    """A hashable, comparable holder for a pretrained table (flax modules are dataclasses
    whose fields are hashed and compared)."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.table if dtype is None else self.table.astype(dtype)

    def __hash__(self) -> int:
        return hash((self.table.shape, str(self.table.dtype), self.table.tobytes()[:64]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Frozen) and np.array_equal(self.table, other.table)
