"""`TransformerEncoderLayer` and `TransformerEncoder`: torch.nn's encoder, same names and math."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .._linen.module import Module, registry_of
from .attention import MultiheadAttention, _canonical_mask
from .container import ModuleList
from .dropout import Dropout
from .linear import Linear
from .mode import call
from .normalization import LayerNorm

Array = jax.Array

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch's F.gelu is the erf form
}


class TransformerEncoderLayer(Module):
    """`torch.nn.TransformerEncoderLayer`: self-attention and feed-forward blocks with
    post-norm (default) or pre-norm (`norm_first=True`) residuals.

    Submodules and `state_dict` as torch's: `self_attn`, `linear1`, `dropout`, `linear2`,
    `norm1`, `norm2`, `dropout1`, `dropout2` (and `activation` when a module is passed as
    `activation`). `activation` is "relu", "gelu" (exact erf form, as torch's `F.gelu`) or a
    callable. `__call__(src, src_mask=None, src_key_padding_mask=None, is_causal=False, *,
    train=False)`: masks as `MultiheadAttention`'s (bool True = not allowed, float added).

    Differences from torch: `train=True` is `model.train()` (dropout from the 'dropout' rng
    stream); there is no fused inference fast path (same results up to rounding); the default
    `activation` is the string "relu" (torch's is the function `F.relu`, the same thing).
    """

    d_model: int
    nhead: int
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str | Callable[[Array], Array] = "relu"
    layer_norm_eps: float = 1e-5
    batch_first: bool = False
    norm_first: bool = False
    bias: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.activation, str) and self.activation not in _ACTIVATIONS:
            raise RuntimeError(f"activation should be relu/gelu, not {self.activation}")
        super().__post_init__()

    def setup(self) -> None:
        d, ff = self.d_model, self.dim_feedforward
        self.self_attn = MultiheadAttention(
            d, self.nhead, dropout=self.dropout, bias=self.bias, batch_first=self.batch_first
        )
        self.linear1 = Linear(d, ff, bias=self.bias)
        self.register_module("dropout", Dropout(self.dropout))  # flax name `_dropout`
        self.linear2 = Linear(ff, d, bias=self.bias)
        self.norm1 = LayerNorm(d, eps=self.layer_norm_eps, bias=self.bias)
        self.norm2 = LayerNorm(d, eps=self.layer_norm_eps, bias=self.bias)
        self.dropout1 = Dropout(self.dropout)
        self.dropout2 = Dropout(self.dropout)
        if isinstance(self.activation, nn.Module):  # torch lists a module activation last
            self.register_module("activation", self.activation)

    def __call__(
        self,
        src: Any,
        src_mask: Any | None = None,
        src_key_padding_mask: Any | None = None,
        is_causal: bool = False,
        *,
        train: bool = False,
    ) -> Array:
        x = jnp.asarray(src)
        kpm = _canonical_mask(
            src_key_padding_mask, "src_key_padding_mask", src_mask, "src_mask", x.dtype
        )
        mask = _canonical_mask(src_mask, "src_mask", None, "", x.dtype)
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), mask, kpm, is_causal, train)
            x = x + self._ff_block(self.norm2(x), train)
        else:
            x = self.norm1(x + self._sa_block(x, mask, kpm, is_causal, train))
            x = self.norm2(x + self._ff_block(x, train))
        return x

    def _sa_block(
        self, x: Array, mask: Array | None, kpm: Array | None, is_causal: bool, train: bool
    ) -> Array:
        x = self.self_attn(
            x,
            x,
            x,
            attn_mask=mask,
            key_padding_mask=kpm,
            need_weights=False,
            is_causal=is_causal,
            train=train,
        )[0]
        return self.dropout1(x, train)

    def _ff_block(self, x: Array, train: bool) -> Array:
        x = self.linear2(self._dropout(self._activation(self.linear1(x)), train))
        return self.dropout2(x, train)

    def _activation(self, x: Array) -> Array:
        act = self.activation
        return _ACTIVATIONS[act](x) if isinstance(act, str) else act(x)


class TransformerEncoder(Module):
    """`torch.nn.TransformerEncoder`: `num_layers` copies of `encoder_layer` (`layers.0`,
    `layers.1`, ...) and an optional final `norm`.

    `__call__(src, mask=None, src_key_padding_mask=None, is_causal=None, *, train=False)`.

    Differences from torch: each layer is initialised on its own (torch deep-copies the
    template, so its layers start with identical weights; load a state_dict for equal
    weights); `is_causal=None` is not resolved by inspecting the mask (the mask given is
    used, which gives the same numbers); `enable_nested_tensor` and `mask_check` are accepted
    and have no effect: there is no nested-tensor fast path, so in inference (torch under
    `no_grad` in eval mode with a `src_key_padding_mask`) torch returns 0 at padded
    positions where this returns the computed values (the other positions agree).
    """

    encoder_layer: nn.Module
    num_layers: int
    norm: nn.Module | None = None
    enable_nested_tensor: bool = True
    mask_check: bool = True

    def setup(self) -> None:
        template = self.encoder_layer
        registry_of(self).module_attrs.add("encoder_layer")  # a template, not a child (torch)
        self.layers = ModuleList([template.clone(parent=None) for _ in range(self.num_layers)])
        if self.norm is not None:
            self.register_module("norm", self.norm)

    def __call__(
        self,
        src: Any,
        mask: Any | None = None,
        src_key_padding_mask: Any | None = None,
        is_causal: bool | None = None,
        *,
        train: bool = False,
    ) -> Array:
        x = jnp.asarray(src)
        kpm = _canonical_mask(src_key_padding_mask, "src_key_padding_mask", mask, "mask", x.dtype)
        mask = _canonical_mask(mask, "mask", None, "", x.dtype)
        for layer in self.layers:
            x = layer(
                x,
                src_mask=mask,
                src_key_padding_mask=kpm,
                is_causal=bool(is_causal),
                train=train,
            )
        if self.norm is not None:
            x = call(self.norm, x, train=train)
        return x
