"""A scanned decoder written the way Gemma-style linen code writes it, and its rules.

`Embedder` keeps `input_embedding` and decodes with it (a tied head with no variable of its
own), `layers` is one `nn.scan` over `Block` (every variable `(L, ...)`), norms are
`pre_attention_norm` / `pre_ffw_norm` / `final_norm` with a `scale`, attention keeps `q_einsum`
`(n, d, h)`, `kv_einsum` `(2, k, d, h)` and `attn_vec_einsum` `(n, h, d)` as einsum weights
`w`, the MLP `gating_einsum` `(2, d, f)` and `linear` `(f, d)`. Its PyTorch twin is
`tests.convert._decoder.Decoder` (Hugging Face's names and layouts); `RULES` is all it takes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_registry.convert import LINEAR, Child, Map, Rule, Scanned, Stacked, einsum_layout
from tests.convert._layers import Config, attend, rms_norm

init = nn.initializers.normal()


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.param("scale", nn.initializers.ones, (x.shape[-1],)), self.eps)


class Einsum(nn.Module):
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        return jnp.einsum(eqn, x, self.param("w", init, self.shape))


class Attention(nn.Module):
    c: Config

    def setup(self) -> None:
        c = self.c
        self.q_einsum = Einsum((c.heads, c.hidden, c.head_dim))
        self.kv_einsum = Einsum((2, c.kv_heads, c.hidden, c.head_dim))
        self.attn_vec_einsum = Einsum((c.heads, c.head_dim, c.hidden))

    def __call__(self, x: jax.Array) -> jax.Array:
        q = self.q_einsum("BTD,NDH->BTNH", x)
        k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
        return self.attn_vec_einsum("BTNH,NHD->BTD", attend(q, k, v))


class FeedForward(nn.Module):
    c: Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gating = self.param("gating_einsum", init, (2, self.c.hidden, self.c.inter))
        linear = self.param("linear", init, (self.c.inter, self.c.hidden))
        return (jax.nn.silu(x @ gating[0]) * (x @ gating[1])) @ linear


class Block(nn.Module):
    c: Config

    def setup(self) -> None:
        self.pre_attention_norm = RMSNorm(self.c.eps)
        self.attn = Attention(self.c)
        self.pre_ffw_norm = RMSNorm(self.c.eps)
        self.mlp = FeedForward(self.c)

    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        x = x + self.attn(self.pre_attention_norm(x))
        return x + self.mlp(self.pre_ffw_norm(x)), None


class Embedder(nn.Module):
    c: Config

    def setup(self) -> None:
        self.input_embedding = self.param("input_embedding", init, (self.c.vocab, self.c.hidden))

    def encode(self, ids: jax.Array) -> jax.Array:
        return self.input_embedding[ids]

    def decode(self, x: jax.Array) -> jax.Array:
        return x @ self.input_embedding.T


class ScannedDecoder(nn.Module):
    c: Config
    remat: bool = False

    def setup(self) -> None:
        block = nn.remat(Block) if self.remat else Block
        scan = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.c.layers
        )
        self.embedder = Embedder(self.c)
        self.layers = scan(self.c)
        self.final_norm = RMSNorm(self.c.eps)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x, _ = self.layers(self.embedder.encode(ids), None)
        return self.embedder.decode(self.final_norm(x))


ATTENTION = Rule(
    Map("q_proj.weight", "q_einsum/w", layout=einsum_layout("BTD,NDH->BTNH")),
    Stacked(
        ("k_proj.weight", "v_proj.weight"), "kv_einsum/w", layout=einsum_layout("BSD,KDH->BSKH")
    ),
    Map("o_proj.weight", "attn_vec_einsum/w", layout=einsum_layout("BTNH,NHD->BTD")),
)
RULES = {
    "layers": Scanned(),  # layers.{i} <-> axis 0 of every variable under `layers`
    ScannedDecoder: Rule(Child("embed_tokens", "embedder"), Child("norm", "final_norm")),
    Embedder: Rule(Map("weight", "input_embedding")),
    Block: Rule(
        Child("input_layernorm", "pre_attention_norm"),
        Child("self_attn", "attn"),
        Child("post_attention_layernorm", "pre_ffw_norm"),
    ),
    Attention: ATTENTION,
    FeedForward: Rule(
        Stacked(("gate_proj.weight", "up_proj.weight"), "gating_einsum", layout=LINEAR),
        Map("down_proj.weight", "linear", layout=LINEAR),
    ),
    RMSNorm: Rule(Map("weight", "scale")),
}
TIED = {"lm_head.weight": "embed_tokens.weight"}
