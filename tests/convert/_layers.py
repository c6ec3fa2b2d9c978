"""Torch-free pieces of the layout tests: the decoder's configuration and the attention math
the flax models share (child processes import these without importing torch)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int = 2
    hidden: int = 8
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 2
    inter: int = 12
    vocab: int = 11
    qkv_bias: bool = False
    eps: float = 1e-6


def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal grouped-query attention: q (B, T, N, H), k and v (B, S, K, H); query head n
    uses key head n // (N // K), as torch's `repeat_interleave` does."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k) / np.sqrt(h)
    scores = jnp.where(np.tril(np.ones((t, t), bool)), scores, -jnp.inf)
    out = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(scores, -1), v)
    return out.reshape(b, t, n, h)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def forward(model: object, variables: object, x: np.ndarray) -> np.ndarray:
    """The flax model's output, compiled once (faster than op by op on CPU)."""
    return np.asarray(jax.jit(model.apply)(variables, x))  # type: ignore[attr-defined]
