"""Moved and renamed variables: a projection's bias one module level up (`attn.q_bias` for
`self_attn.q_proj.bias`), submodules under other names (`pre_attention_norm` for
`input_layernorm`, T5-style `wi_0` / `wi_1` / `wo` for `gate_proj` / `up_proj` / `down_proj`),
and a tied output head with no variable of its own (`embed_tokens.attend`), against the PyTorch
twin, both directions, in torch's key order."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from flax_registry.convert import Child, Layout, Map, Rule, from_torch, to_torch
from tests.convert._decoder import Config, Decoder, attend, forward, run, twin
from tests.convert._helpers import assert_bit_identical
from tests.parity import TOL

C = Config(layers=2, qkv_bias=True)


class Attention(nn.Module):
    """Bias-free projections, each bias kept per head by the attention module itself."""

    c: Config

    def setup(self) -> None:
        c = self.c
        self.q = nn.Dense(c.heads * c.head_dim, use_bias=False)
        self.q_bias = self.param("q_bias", nn.initializers.zeros, (c.heads, c.head_dim))
        self.k = nn.Dense(c.kv_heads * c.head_dim, use_bias=False)
        self.k_bias = self.param("k_bias", nn.initializers.zeros, (c.kv_heads, c.head_dim))
        self.v = nn.Dense(c.kv_heads * c.head_dim, use_bias=False)
        self.v_bias = self.param("v_bias", nn.initializers.zeros, (c.kv_heads, c.head_dim))
        self.o = nn.Dense(c.hidden, use_bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, *self.q_bias.shape) + self.q_bias
        k = self.k(x).reshape(b, t, *self.k_bias.shape) + self.k_bias
        v = self.v(x).reshape(b, t, *self.v_bias.shape) + self.v_bias
        return self.o(attend(q, k, v).reshape(b, t, -1))


class MLP(nn.Module):
    c: Config

    def setup(self) -> None:
        self.wi_0 = nn.Dense(self.c.inter, use_bias=False)
        self.wi_1 = nn.Dense(self.c.inter, use_bias=False)
        self.wo = nn.Dense(self.c.hidden, use_bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(jax.nn.silu(self.wi_0(x)) * self.wi_1(x))


class Block(nn.Module):
    c: Config

    def setup(self) -> None:
        self.attn = Attention(self.c)
        self.mlp = MLP(self.c)
        self.pre_attention_norm = nn.RMSNorm(epsilon=self.c.eps)
        self.pre_ffw_norm = nn.RMSNorm(epsilon=self.c.eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.pre_attention_norm(x))
        return x + self.mlp(self.pre_ffw_norm(x))


class LM(nn.Module):
    c: Config

    def setup(self) -> None:
        self.embed_tokens = nn.Embed(self.c.vocab, self.c.hidden)
        self.layers = [Block(self.c) for _ in range(self.c.layers)]
        self.norm = nn.RMSNorm(epsilon=self.c.eps)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.embed_tokens.attend(self.norm(x))  # the head: no variable of its own


PER_HEAD = Layout(merge=(2,))  # (heads, head_dim) <-> (heads * head_dim,)
RULES = {
    Attention: Rule(
        Map("q_proj.bias", "q_bias", layout=PER_HEAD),
        Map("k_proj.bias", "k_bias", layout=PER_HEAD),
        Map("v_proj.bias", "v_bias", layout=PER_HEAD),
        Child("q_proj", "q"),
        Child("k_proj", "k"),
        Child("v_proj", "v"),
        Child("o_proj", "o"),
    ),
    MLP: Rule(Child("gate_proj", "wi_0"), Child("up_proj", "wi_1"), Child("down_proj", "wo")),
    Block: Rule(
        Child("self_attn", "attn"),
        Child("input_layernorm", "pre_attention_norm"),
        Child("post_attention_layernorm", "pre_ffw_norm"),
    ),
}
TIED = {"lm_head.weight": "embed_tokens.weight"}


def _ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, C.vocab, (2, 5))


def test_moved_and_renamed_variables_from_the_twin_and_back() -> None:
    torch_model = twin(C)
    sd = torch_model.state_dict()
    model = LM(C)
    variables, report = from_torch(model, sd, example_inputs=(_ids(),), rules=RULES, tied=TIED)
    assert report.ok, report
    assert report.tied_aliases == [("lm_head.weight", "embed_tokens.weight")]
    attn = variables["params"]["layers_0"]["attn"]
    assert attn["q_bias"].shape == (C.heads, C.head_dim) and "bias" not in attn["q"]
    ids = _ids(1)
    np.testing.assert_allclose(forward(model, variables, ids), run(torch_model, ids), **TOL)
    back = to_torch(model, variables, rules=RULES, tied=TIED, as_torch=True)
    Decoder(C).load_state_dict(back, strict=True)
    # torch's own order: q_proj.weight (the child's), then q_proj.bias (moved up), ...
    assert_bit_identical(back, sd)


def test_tied_head_found_in_the_checkpoint_without_tied() -> None:
    """The twin's state_dict stores lm_head.weight as the embedding's very tensor: a tied
    alias by itself; `tied=` writes it back."""
    torch_model = twin(C)
    model = LM(C)
    variables, report = from_torch(
        model, torch_model.state_dict(), example_inputs=(_ids(),), rules=RULES
    )
    assert report.ok and report.checkpoint_aliases == {"lm_head.weight": "embed_tokens.weight"}
    assert_bit_identical(
        to_torch(model, variables, rules=RULES, report=report), torch_model.state_dict()
    )


def test_child_naming_no_child_or_a_mapped_one() -> None:
    sd = twin(C).state_dict()
    typo = RULES | {MLP: Rule(Child("gate_proj", "wi0"))}
    with pytest.raises(
        ValueError,
        match=r"Child\('gate_proj', 'wi0'\) in the rule for MLP at "
        r"flax scope 'layers_0/mlp' names flax child 'wi0', which the layer does "
        r"not have; its children are \['wi_0', 'wi_1', 'wo'\]",
    ):
        from_torch(LM(C), sd, example_inputs=(_ids(),), rules=typo, tied=TIED)
    both = RULES | {MLP: Rule(Map("gate_proj.weight", "wi_0/kernel"), Child("gate_proj", "wi_0"))}
    with pytest.raises(
        ValueError,
        match=r"renames child 'wi_0', but the rule's own entries "
        r"already map variables of that child \(\['params/wi_0/kernel'\]\)",
    ):
        from_torch(LM(C), sd, example_inputs=(_ids(),), rules=both, tied=TIED)
