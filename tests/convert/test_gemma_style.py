"""A check on code written elsewhere: Hugging Face transformers' own PyTorch `GemmaForCausalLM`
(rotary embeddings, gelu-tanh GeGLU, RMSNorm with `1 + weight`, the embedding scaled by
sqrt(d), a tied head) converted into a linen model written with google-deepmind/gemma's
conventions (`Embedder.input_embedding`, einsum weights `w` in `q_einsum` / `kv_einsum` /
`qkv_einsum` / `attn_vec_einsum`, `gating_einsum` / `linear`, norms with a `scale` named
`pre_attention_norm` / `pre_ffw_norm` / `final_norm`), its blocks under one `nn.scan` of
`nn.remat` (MaxText's scanned layers). Logits equal at 1e-5, back into a strict load, bit for
bit."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_registry.convert import (
    LINEAR,
    Child,
    Map,
    Rule,
    Scanned,
    Stacked,
    einsum_layout,
    from_torch,
    to_torch,
)
from tests.convert._helpers import assert_bit_identical
from tests.parity import TOL

transformers = pytest.importorskip("transformers")

N, D, H, F, L, VOCAB = 4, 32, 8, 48, 6, 64
init = nn.initializers.normal()


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + 1e-6) * (1 + scale)


class Einsum(nn.Module):
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        return jnp.einsum(eqn, x, self.param("w", init, self.shape))


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: int = 10_000) -> jax.Array:
    half = x.shape[-1] // 2
    timescale = max_wavelength ** (2 * jnp.arange(half) / x.shape[-1])
    sinusoid = positions[..., None] / timescale[None, None, :]
    sin, cos = jnp.sin(sinusoid)[..., None, :], jnp.cos(sinusoid)[..., None, :]
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


class Attention(nn.Module):
    kv_heads: int

    def setup(self) -> None:
        if self.kv_heads == N:
            self.qkv_einsum = Einsum((3, N, D, H))
        else:
            self.q_einsum = Einsum((N, D, H))
            self.kv_einsum = Einsum((2, self.kv_heads, D, H))
        self.attn_vec_einsum = Einsum((N, H, D))

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        k_heads = self.kv_heads
        if k_heads == N:
            q, k, v = self.qkv_einsum("BTD,SNDH->SBTNH", x)
        else:
            q = self.q_einsum("BTD,NDH->BTNH", x)
            k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
        q, k = apply_rope(q, positions) * H**-0.5, apply_rope(k, positions)
        b, t = x.shape[:2]
        q = q.reshape(b, t, k_heads, N // k_heads, H)
        logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k)
        causal = jnp.tril(jnp.ones((t, t), bool))[:, None, None, :]
        probs = jax.nn.softmax(jnp.where(causal, logits, -2.3819763e38), -1)
        encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(b, t, N, H)
        return self.attn_vec_einsum("BTNH,NHD->BTD", encoded)


class FeedForward(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("gating_einsum", init, (2, D, F))
        gate = jax.nn.gelu(x @ w[0], approximate=True)
        return (gate * (x @ w[1])) @ self.param("linear", init, (F, D))


class Block(nn.Module):
    kv_heads: int

    def setup(self) -> None:
        self.pre_attention_norm = RMSNorm()
        self.attn = Attention(self.kv_heads)
        self.pre_ffw_norm = RMSNorm()
        self.mlp = FeedForward()

    def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, None]:
        x = x + self.attn(self.pre_attention_norm(x), positions)
        return x + self.mlp(self.pre_ffw_norm(x)), None


class Embedder(nn.Module):
    def setup(self) -> None:
        self.input_embedding = self.param("input_embedding", init, (VOCAB, D))

    def encode(self, ids: jax.Array) -> jax.Array:
        return self.input_embedding[ids] * jnp.sqrt(D).astype(jnp.float32)

    def decode(self, x: jax.Array) -> jax.Array:
        return x @ self.input_embedding.T


class Transformer(nn.Module):
    kv_heads: int

    def setup(self) -> None:
        scan = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=L,
        )
        self.embedder = Embedder()
        self.layers = scan(self.kv_heads)
        self.final_norm = RMSNorm()

    def __call__(self, ids: jax.Array) -> jax.Array:
        positions = jnp.arange(ids.shape[1])[None]
        x, _ = self.layers(self.embedder.encode(ids), positions)
        return self.embedder.decode(self.final_norm(x))


def gemma_rules(kv_heads: int) -> dict[Any, Any]:
    """Everything it takes to convert between the two: data, no tensor code."""
    q, kv, out = "BTD,NDH->BTNH", "BSD,KDH->BSKH", "BTNH,NHD->BTD"
    qkv = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
    projections = (
        [Stacked(qkv, "qkv_einsum/w", layout=einsum_layout(q))]
        if kv_heads == N
        else [
            Map("q_proj.weight", "q_einsum/w", layout=einsum_layout(q)),
            Stacked(qkv[1:], "kv_einsum/w", layout=einsum_layout(kv)),
        ]
    )
    return {
        "model.layers": Scanned(),
        Transformer: Rule(
            Child("model.embed_tokens", "embedder"),
            Child("model.layers", "layers"),
            Child("model.norm", "final_norm"),
        ),
        Embedder: Rule(Map("weight", "input_embedding")),
        Block: Rule(
            Child("input_layernorm", "pre_attention_norm"),
            Child("self_attn", "attn"),
            Child("post_attention_layernorm", "pre_ffw_norm"),
        ),
        Attention: Rule(
            *projections, Map("o_proj.weight", "attn_vec_einsum/w", layout=einsum_layout(out))
        ),
        FeedForward: Rule(
            Stacked(("gate_proj.weight", "up_proj.weight"), "gating_einsum", layout=LINEAR),
            Map("down_proj.weight", "linear", layout=LINEAR),
        ),
        RMSNorm: Rule(Map("weight", "scale")),
    }


@pytest.mark.parametrize("kv_heads", [1, N], ids=["multi-query (q + kv)", "multi-head (qkv)"])
def test_transformers_gemma_into_a_gemma_style_scanned_model(kv_heads: int) -> None:
    config = transformers.GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=L,
        num_attention_heads=N,
        num_key_value_heads=kv_heads,
        head_dim=H,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.GemmaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 7))
    model, rules = Transformer(kv_heads), gemma_rules(kv_heads)
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    sd = hf.state_dict()
    variables, report = from_torch(model, sd, example_inputs=(ids,), rules=rules, tied=tied)
    assert report.ok, report
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(jax.jit(model.apply)(variables, ids))
    np.testing.assert_allclose(got, expected, **TOL)
    back = to_torch(model, variables, rules=rules, tied=tied, as_torch=True)
    transformers.GemmaForCausalLM(config).load_state_dict(back, strict=True)
    assert_bit_identical(dict(sorted(back.items())), dict(sorted(sd.items())))
