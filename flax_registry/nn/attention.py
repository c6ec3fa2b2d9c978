"""`MultiheadAttention`: `torch.nn.MultiheadAttention` with its parameters, masks and outputs."""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from .._linen.module import Module
from .._parameter import Parameter
from . import _init
from .dropout import dropout
from .linear import Linear

Array = jax.Array

_NEED_CAUSAL_MASK = (
    "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
    "`generate_square_subsequent_mask` to create this mask."
)


class MultiheadAttention(Module):
    """`torch.nn.MultiheadAttention` with the same constructor arguments and `state_dict`.

    Parameters: `in_proj_weight` (3E, E) and `in_proj_bias` when `kdim == vdim == embed_dim`,
    else `q_proj_weight`, `k_proj_weight`, `v_proj_weight` and `in_proj_bias`; `bias_k`,
    `bias_v` with `add_bias_kv`; the `out_proj` submodule (`weight`, `bias`). Initialised as
    torch: xavier-uniform projections, zero biases, xavier-normal `bias_k`/`bias_v`.

    `__call__` takes torch's arguments and returns `(attn_output, attn_weights or None)` with
    torch's shapes: boolean masks are True where attending is *not* allowed, float masks are
    added to the scores; `attn_mask` is (L, S) or (N * num_heads, L, S); unbatched (2-D)
    inputs; `batch_first`. `is_causal=True` is the same hint as in torch: it needs
    `attn_mask`, and where torch then ignores the mask (no `key_padding_mask`,
    `need_weights=False`) a causal mask is used in its place.

    Differences from torch: `train=True` is `model.train()` (dropout on the attention
    weights draws from the 'dropout' rng stream); there is no fused "fast path" (the results
    agree with it up to rounding, except that torch's fast path may return 0 instead of NaN
    for a query whose keys are all masked); torch's `AssertionError`s for bad shapes are
    `ValueError`s here (same messages).
    """

    embed_dim: int
    num_heads: int
    dropout: float = 0.0
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    kdim: int | None = None
    vdim: int | None = None
    batch_first: bool = False

    def __post_init__(self) -> None:
        if self.embed_dim <= 0 or self.num_heads <= 0:
            raise ValueError(
                "embed_dim and num_heads must be greater than 0, got "
                f"embed_dim={self.embed_dim} and num_heads={self.num_heads} instead"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                "embed_dim must be divisible by num_heads, got "
                f"embed_dim={self.embed_dim} and num_heads={self.num_heads}"
            )
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def _kdim(self) -> int:
        return self.kdim if self.kdim is not None else self.embed_dim

    @property
    def _vdim(self) -> int:
        return self.vdim if self.vdim is not None else self.embed_dim

    @property
    def _qkv_same_embed_dim(self) -> bool:
        return self._kdim == self.embed_dim and self._vdim == self.embed_dim

    def setup(self) -> None:
        e, xavier = self.embed_dim, _init.xavier_uniform()
        if self._qkv_same_embed_dim:
            self.register_parameter("in_proj_weight", Parameter(xavier, (3 * e, e)))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.register_parameter("q_proj_weight", Parameter(xavier, (e, e)))
            self.register_parameter("k_proj_weight", Parameter(xavier, (e, self._kdim)))
            self.register_parameter("v_proj_weight", Parameter(xavier, (e, self._vdim)))
            self.register_parameter("in_proj_weight", None)
        bias = Parameter(_init.zeros(), (3 * e,))
        self.register_parameter("in_proj_bias", bias if self.bias else None)
        for name in ("bias_k", "bias_v"):
            self.register_parameter(
                name, Parameter(_init.xavier_normal(), (1, 1, e)) if self.add_bias_kv else None
            )
        self.out_proj = NonDynamicallyQuantizableLinear(e, e, bias=self.bias)

    def __call__(
        self,
        query: Any,
        key: Any,
        value: Any,
        key_padding_mask: Any | None = None,
        need_weights: bool = True,
        attn_mask: Any | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        train: bool = False,
    ) -> tuple[Array, Array | None]:
        # self-attention (one array for all three): one packed projection, as torch
        packed = self._qkv_same_embed_dim and query is key and key is value
        query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
        batched = _shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if batched and self.batch_first:
            if packed:
                query = key = value = jnp.swapaxes(query, 0, 1)
            else:
                query, key, value = (jnp.swapaxes(x, 0, 1) for x in (query, key, value))
        if not batched:
            query, key, value = query[:, None], key[:, None], value[:, None]
            if key_padding_mask is not None:
                key_padding_mask = jnp.asarray(key_padding_mask)[None]
        tgt_len, bsz, embed_dim = query.shape
        dtype = query.dtype
        kpm = _canonical_mask(key_padding_mask, "key_padding_mask", attn_mask, "attn_mask", dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError(_NEED_CAUSAL_MASK)
        causal = is_causal and kpm is None and not need_weights
        mask = None if causal else _canonical_mask(attn_mask, "attn_mask", None, "", dtype)
        if embed_dim != self.embed_dim:
            raise ValueError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}"
            )
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise ValueError(f"key shape {key.shape} does not match value shape {value.shape}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                f"{value.shape[:2]}"
            )
        q, k, v = self._in_projection(query, key, value, packed)
        mask = _mask_4d(mask, tgt_len, key.shape[0], bsz, self.num_heads)
        h, hd = self.num_heads, self.head_dim
        if self.add_bias_kv:
            k = jnp.concatenate([k, jnp.tile(self.get_parameter("bias_k"), (1, bsz, 1))])
            v = jnp.concatenate([v, jnp.tile(self.get_parameter("bias_v"), (1, bsz, 1))])
            mask, kpm = _pad_last(mask), _pad_last(kpm)
        # (seq, batch, heads * hd) -> (batch, heads, seq, hd): torch's (batch * heads) order
        q, k, v = (x.reshape(x.shape[0], bsz, h, hd).transpose(1, 2, 0, 3) for x in (q, k, v))
        if self.add_zero_attn:
            k = jnp.concatenate([k, jnp.zeros((bsz, h, 1, hd), k.dtype)], axis=2)
            v = jnp.concatenate([v, jnp.zeros((bsz, h, 1, hd), v.dtype)], axis=2)
            mask, kpm = _pad_last(mask), _pad_last(kpm)
        src_len = k.shape[2]
        if kpm is not None:
            if kpm.shape != (bsz, src_len):
                i = 0 if kpm.shape[0] != bsz else 1
                raise ValueError(
                    f"Expected key_padded_mask.shape[{i}] to be {(bsz, src_len)[i]}, "
                    f"but got {kpm.shape[i]}"
                )
            kpm = kpm[:, None, None, :]
            mask = kpm if mask is None else mask + kpm
        if causal:
            allowed = jnp.tril(jnp.ones((tgt_len, src_len), bool))
            mask = jnp.where(allowed, 0.0, -jnp.inf).astype(dtype)
        scores = jnp.einsum("nhld,nhsd->nhls", q * math.sqrt(1.0 / hd), k)
        if mask is not None:
            scores = scores + mask
        weights = jax.nn.softmax(scores, axis=-1)
        if train and self.dropout > 0:
            weights = dropout(self, weights, self.dropout)
        out = jnp.einsum("nhls,nhsd->lnhd", weights, v).reshape(tgt_len, bsz, embed_dim)
        out = self.out_proj(out)
        if not batched:
            out = out[:, 0]
        elif self.batch_first:
            out = jnp.swapaxes(out, 0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(axis=1)
        return out, weights if batched else weights[0]

    def _in_projection(
        self, query: Array, key: Array, value: Array, packed: bool
    ) -> tuple[Array, ...]:
        if packed:  # query is key is value: one (3E, E) matmul
            qkv = query @ self.get_parameter("in_proj_weight").T
            if self.bias:
                qkv = qkv + self.get_parameter("in_proj_bias")
            return tuple(jnp.split(qkv, 3, axis=-1))
        if self._qkv_same_embed_dim:
            weights = jnp.split(self.get_parameter("in_proj_weight"), 3)
        else:
            weights = [self.get_parameter(f"{c}_proj_weight") for c in "qkv"]
        bias = jnp.split(self.get_parameter("in_proj_bias"), 3) if self.bias else [None] * 3
        out = []
        for x, w, b in zip((query, key, value), weights, bias):
            y = x @ w.T
            out.append(y if b is None else y + b)
        return tuple(out)


class NonDynamicallyQuantizableLinear(Linear):
    """torch's `out_proj` class: a `Linear` whose bias `MultiheadAttention` sets to zero."""

    def setup(self) -> None:
        shape = (self.out_features, self.in_features)
        self.register_parameter("weight", Parameter(_init.default_weight(), shape, self.dtype))
        bias = Parameter(_init.zeros(), (self.out_features,), self.dtype)
        self.register_parameter("bias", bias if self.bias else None)


def _shape_check(
    query: Array, key: Array, value: Array, kpm: Any, attn_mask: Any, num_heads: int
) -> bool:
    """torch's `_mha_shape_check` with its messages: True for batched (3-D) input."""
    dims = (key.ndim, value.ndim)
    if query.ndim == 3:
        if dims != (3, 3):
            raise ValueError(
                "For batched (3-D) `query`, expected `key` and `value` to be 3-D but found "
                f"{dims[0]}-D and {dims[1]}-D tensors respectively"
            )
        if kpm is not None and jnp.ndim(kpm) != 2:
            raise ValueError(
                "For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D "
                f"but found {jnp.ndim(kpm)}-D tensor instead"
            )
        kind = "batched (3-D)"
    elif query.ndim == 2:
        if dims != (2, 2):
            raise ValueError(
                "For unbatched (2-D) `query`, expected `key` and `value` to be 2-D but found "
                f"{dims[0]}-D and {dims[1]}-D tensors respectively"
            )
        if kpm is not None and jnp.ndim(kpm) != 1:
            raise ValueError(
                "For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or 1-D "
                f"but found {jnp.ndim(kpm)}-D tensor instead"
            )
        kind = "unbatched (2-D)"
        if attn_mask is not None and jnp.ndim(attn_mask) == 3:
            expected = (num_heads, query.shape[0], key.shape[0])
            if tuple(jnp.shape(attn_mask)) != expected:
                raise ValueError(
                    f"Expected `attn_mask` shape to be {expected} but got {jnp.shape(attn_mask)}"
                )
    else:
        raise ValueError(
            "query should be unbatched 2D or batched 3D tensor but received "
            f"{query.ndim}-D query tensor"
        )
    if attn_mask is not None and jnp.ndim(attn_mask) not in (2, 3):
        raise ValueError(
            f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
            f"{jnp.ndim(attn_mask)}-D tensor instead"
        )
    return query.ndim == 3


def _canonical_mask(mask: Any, name: str, other: Any, other_name: str, dtype: Any) -> Array | None:
    """torch's `_canonical_mask`: a bool mask becomes -inf where True and 0 elsewhere, a float
    mask is used as is (in the query's dtype); any other dtype is an error."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    is_float = jnp.issubdtype(mask.dtype, jnp.floating)
    if mask.dtype != jnp.bool_ and not is_float:
        raise TypeError(
            f"only bool and floating types of {name} are supported, got {mask.dtype}; "
            f"pass a bool mask (True = not allowed to attend) or an additive float mask."
        )
    if other is not None and jnp.asarray(other).dtype != mask.dtype:
        warnings.warn(
            f"Support for mismatched {name} and {other_name} is deprecated. "
            "Use same type for both instead.",
            UserWarning,
            stacklevel=4,
        )
    if not is_float:
        return jnp.where(mask, -jnp.inf, 0.0).astype(dtype)
    return mask.astype(dtype)


def _mask_4d(mask: Array | None, tgt_len: int, src_len: int, bsz: int, heads: int) -> Array | None:
    """An attn_mask as (1 or batch, 1 or heads, L, S), checking torch's 2-D/3-D shapes."""
    if mask is None:
        return None
    if mask.ndim == 2:
        if mask.shape != (tgt_len, src_len):
            raise ValueError(
                f"The shape of the 2D attn_mask is {mask.shape}, but should be "
                f"{(tgt_len, src_len)}."
            )
        return mask[None, None]
    if mask.shape != (bsz * heads, tgt_len, src_len):
        raise ValueError(
            f"The shape of the 3D attn_mask is {mask.shape}, but should be "
            f"{(bsz * heads, tgt_len, src_len)}."
        )
    return mask.reshape(bsz, heads, tgt_len, src_len)


def _pad_last(mask: Array | None) -> Array | None:
    """One more key position, allowed (torch's `pad(mask, (0, 1))`)."""
    if mask is None:
        return None
    return jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, 1)])
