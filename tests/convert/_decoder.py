"""The PyTorch twin of the layout tests: a Llama/Qwen-style decoder written the way Hugging Face
writes it (`q_proj`/`k_proj`/`v_proj`/`o_proj` Linear layers, grouped-query heads repeated with
`repeat_interleave`, `gate_proj`/`up_proj`/`down_proj`, `input_layernorm`, `layers` as a
ModuleList, a head tied to the embedding).

The flax models themselves are written in each test, in the styles JAX codebases use."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as T

from tests.convert._layers import Config as Config
from tests.convert._layers import attend as attend
from tests.convert._layers import forward as forward
from tests.convert._layers import rms_norm as rms_norm


class Attention(T.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c = c
        self.q_proj = T.Linear(c.hidden, c.heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = T.Linear(c.hidden, c.kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = T.Linear(c.hidden, c.kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = T.Linear(c.heads * c.head_dim, c.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, (b, t, _) = self.c, x.shape
        q = self.q_proj(x).view(b, t, c.heads, c.head_dim)
        k = self.k_proj(x).view(b, t, c.kv_heads, c.head_dim)
        v = self.v_proj(x).view(b, t, c.kv_heads, c.head_dim)
        k = k.repeat_interleave(c.heads // c.kv_heads, dim=2)
        v = v.repeat_interleave(c.heads // c.kv_heads, dim=2)
        scores = torch.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(c.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = torch.einsum("bnts,bsnh->btnh", p, v).reshape(b, t, c.heads * c.head_dim)
        return self.o_proj(out)


class MLP(T.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.gate_proj = T.Linear(c.hidden, c.inter, bias=False)
        self.up_proj = T.Linear(c.hidden, c.inter, bias=False)
        self.down_proj = T.Linear(c.inter, c.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(T.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = T.RMSNorm(c.hidden, eps=c.eps)
        self.post_attention_layernorm = T.RMSNorm(c.hidden, eps=c.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(T.Module):
    """`embed_tokens`, `layers.{i}`, `norm`, and `lm_head` tied to the embedding."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.embed_tokens = T.Embedding(c.vocab, c.hidden)
        self.layers = T.ModuleList([DecoderLayer(c) for _ in range(c.layers)])
        self.norm = T.RMSNorm(c.hidden, eps=c.eps)
        self.lm_head = T.Linear(c.hidden, c.vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def twin(c: Config, seed: int = 0) -> T.Module:
    """A twin with every weight random (norm weights too), in eval mode: a `Decoder`, or one
    `DecoderLayer` for `layers=0`."""
    torch.manual_seed(seed)
    model = Decoder(c) if c.layers else DecoderLayer(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def run(model: T.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def forbid_reads(monkeypatch: object) -> None:
    """Make every tensor read fail: what raises after this raised before reading data."""
    from flax_registry.convert._source import Source

    def refuse(self: Source, key: str, *args: object) -> np.ndarray:
        raise AssertionError(f"tensor data of {key!r} was read")

    monkeypatch.setattr(Source, "read", refuse)  # type: ignore[attr-defined]
    monkeypatch.setattr(Source, "read_slice", refuse)  # type: ignore[attr-defined]
