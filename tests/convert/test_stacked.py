"""Stacked projections: several torch keys as one flax variable on a new axis, and back.

Gemma-style attention keeps q, k, v as one `qkv (3, n, e, h)` einsum weight (or `q` plus
`kv (2, k, e, h)` with grouped-query heads); fused blocks keep `gate_proj` + `up_proj` as one
`(2, e, f)` and a q/k/v bias as `(3, n, h)`; mixtures keep their experts as one `(x, d, f)`.
Each loads from its PyTorch twin's state_dict by rules alone, computes what the twin computes,
and goes back bit-identical into a strict torch load."""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as T

from flax_registry.convert import (
    LINEAR,
    Child,
    Map,
    Rule,
    Stacked,
    einsum_layout,
    from_torch,
    to_torch,
)
from tests.convert._decoder import (
    Attention,
    Config,
    DecoderLayer,
    attend,
    forbid_reads,
    forward,
    run,
    twin,
)
from tests.convert._helpers import assert_bit_identical, numpy_state
from tests.parity import TOL

MHA = Config(layers=0, heads=4, kv_heads=4)
GQA = Config(layers=0, heads=4, kv_heads=2)
Q, KV, OUT = "BTD,NDH->BTNH", "BSD,KDH->BSKH", "BTNH,NHD->BTD"


def _x(c: Config, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 5, c.hidden)).astype(np.float32)


class Einsum(nn.Module):
    """gemma/modules.py's parametrized einsum: one weight `w`, the equation given per call."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        return jnp.einsum(eqn, x, self.param("w", nn.initializers.normal(), self.shape))


class GemmaAttention(nn.Module):
    """Gemma's attention: `qkv_einsum (3, n, d, h)` when every head has its own key and value,
    `q_einsum (n, d, h)` + `kv_einsum (2, k, d, h)` with grouped-query heads."""

    c: Config

    def setup(self) -> None:
        c = self.c
        if c.kv_heads == c.heads:
            self.qkv_einsum = Einsum((3, c.heads, c.hidden, c.head_dim))
        else:
            self.q_einsum = Einsum((c.heads, c.hidden, c.head_dim))
            self.kv_einsum = Einsum((2, c.kv_heads, c.hidden, c.head_dim))
        self.attn_vec_einsum = Einsum((c.heads, c.head_dim, c.hidden))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.c.kv_heads == self.c.heads:
            q, k, v = self.qkv_einsum("BTD,SNDH->SBTNH", x)
        else:
            q = self.q_einsum(Q, x)
            k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
        return self.attn_vec_einsum(OUT, attend(q, k, v))


QKV_KEYS = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
OUT_MAP = Map("o_proj.weight", "attn_vec_einsum/w", layout=einsum_layout(OUT))
STACKED_QKV = {
    GemmaAttention: Rule(Stacked(QKV_KEYS, "qkv_einsum/w", layout=einsum_layout(Q)), OUT_MAP)
}
STACKED_KV = {
    GemmaAttention: Rule(
        Map("q_proj.weight", "q_einsum/w", layout=einsum_layout(Q)),
        Stacked(("k_proj.weight", "v_proj.weight"), "kv_einsum/w", layout=einsum_layout(KV)),
        OUT_MAP,
    )
}


@pytest.mark.parametrize(
    ("c", "rules"), [(MHA, STACKED_QKV), (GQA, STACKED_KV)], ids=["qkv", "q+kv"]
)
def test_gemma_attention_stacks_q_k_v(c: Config, rules: dict[Any, Rule]) -> None:
    torch_attn = twin(c).self_attn
    x = _x(c)
    model = GemmaAttention(c)
    variables, report = from_torch(model, torch_attn.state_dict(), example_inputs=(x,), rules=rules)
    assert report.ok, report
    params = variables["params"]
    if c.kv_heads == c.heads:
        assert params["qkv_einsum"]["w"].shape == (3, c.heads, c.hidden, c.head_dim)
    else:
        assert params["kv_einsum"]["w"].shape == (2, c.kv_heads, c.hidden, c.head_dim)
    np.testing.assert_allclose(forward(model, variables, x), run(torch_attn, x), **TOL)
    back = to_torch(model, variables, rules=rules, as_torch=True)
    Attention(c).load_state_dict(back, strict=True)
    assert_bit_identical(back, torch_attn.state_dict())


# --- a fused block: raw qkv / qkv_bias / gate-up parameters, norms under other names -----------


class FusedBlock(nn.Module):
    """One decoder layer as fused-kernel codebases write it: raw parameters `qkv (3, n, e, h)`,
    `qkv_bias (3, n, h)`, `out (n, h, e)`, `wi (2, e, f)` (gate, up), `wo (f, e)`."""

    c: Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, init = self.c, nn.initializers.normal()
        n, e, h, f = c.heads, c.hidden, c.head_dim, c.inter
        qkv = self.param("qkv", init, (3, n, e, h))
        qkv_bias = self.param("qkv_bias", init, (3, n, h))
        out = self.param("out", init, (n, h, e))
        wi = self.param("wi", init, (2, e, f))
        wo = self.param("wo", init, (f, e))
        y = nn.RMSNorm(epsilon=c.eps, name="ln1")(x)
        q, k, v = jnp.einsum("BTE,SNEH->SBTNH", y, qkv) + qkv_bias[:, None, None]
        x = x + jnp.einsum("BTNH,NHE->BTE", attend(q, k, v), out)
        y = nn.RMSNorm(epsilon=c.eps, name="ln2")(x)
        gate, up = jnp.einsum("BTE,SEF->SBTF", y, wi)
        return x + (jax.nn.silu(gate) * up) @ wo


ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
FUSED_BLOCK = {
    FusedBlock: Rule(
        Stacked(tuple(f"{p}.weight" for p in ATTN), "qkv", layout=einsum_layout("BTE,NEH->BTNH")),
        Stacked(
            tuple(f"{p}.bias" for p in ATTN),
            "qkv_bias",
            layout=einsum_layout("BTE,NEH->BTNH", "bias"),
        ),
        Map("self_attn.o_proj.weight", "out", layout=einsum_layout("BTNH,NHE->BTE")),
        Stacked(("mlp.gate_proj.weight", "mlp.up_proj.weight"), "wi", layout=LINEAR),
        Map("mlp.down_proj.weight", "wo", layout=LINEAR),
        Child("input_layernorm", "ln1"),
        Child("post_attention_layernorm", "ln2"),
    )
}


def test_fused_block_from_its_twin_and_back() -> None:
    c = Config(layers=0, heads=4, kv_heads=4, qkv_bias=True)
    layer = twin(c)
    x = _x(c)
    model = FusedBlock(c)
    variables, report = from_torch(
        model, layer.state_dict(), example_inputs=(x,), rules=FUSED_BLOCK
    )
    assert report.ok, report
    assert variables["params"]["wi"].shape == (2, c.hidden, c.inter)
    np.testing.assert_allclose(forward(model, variables, x), run(layer, x), **TOL)
    back = to_torch(model, variables, rules=FUSED_BLOCK, as_torch=True)
    DecoderLayer(c).load_state_dict(back, strict=True)
    assert_bit_identical(back, layer.state_dict())  # torch's order: q.weight, q.bias, k.weight...


def test_stacking_composes_with_renames_and_dtype() -> None:
    c = Config(layers=0, heads=4, kv_heads=4, qkv_bias=True)
    bf16 = {f"model.{k}": v for k, v in twin(c).to(torch.bfloat16).state_dict().items()}
    x = _x(c)
    model = FusedBlock(c)
    variables, report = from_torch(
        model, bf16, example_inputs=(x,), rules=FUSED_BLOCK, renames={r"^model\.": ""}
    )
    assert report.ok and {k for k, _, _ in report.casts} == {k[6:] for k in bf16}
    assert variables["params"]["qkv"].dtype == jnp.float32
    assert_bit_identical(to_torch(model, variables, rules=FUSED_BLOCK, report=report), bf16)
    kept, _ = from_torch(
        model,
        bf16,
        example_inputs=(x,),
        rules=FUSED_BLOCK,
        renames={r"^model\.": ""},
        dtype="checkpoint",
    )
    assert kept["params"]["qkv"].dtype == jnp.bfloat16
    plain = to_torch(model, kept, rules=FUSED_BLOCK)
    assert_bit_identical(plain, {k[6:]: v for k, v in bf16.items()})


# --- a template: one key per index of the stacked axis ----------------------------------------


class TorchExperts(T.Module):
    def __init__(self, d: int = 6, f: int = 5, n: int = 3) -> None:
        super().__init__()
        self.experts = T.ModuleList([T.Linear(d, f, bias=False) for _ in range(n)])
        self.router = T.Linear(d, n, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.router(x).softmax(-1)
        outs = torch.stack([e(x) for e in self.experts], -2)  # (..., n, f)
        return (gates.unsqueeze(-1) * outs).sum(-2)


class Experts(nn.Module):
    """Dense mixture: one `w (n, d, f)` for the n expert Linear layers."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("w", nn.initializers.normal(), (3, x.shape[-1], 5))
        gates = jax.nn.softmax(nn.Dense(3, use_bias=False, name="router")(x), -1)
        return jnp.einsum("...n,...nf->...f", gates, jnp.einsum("...d,ndf->...nf", x, w))


def test_stacked_template_is_one_key_per_index() -> None:
    torch_experts = TorchExperts().eval()
    x = _x(Config(hidden=6))
    model = Experts()
    rules = {Experts: Rule(Stacked("experts.{i}.weight", "w", layout=LINEAR))}
    variables, report = from_torch(
        model, torch_experts.state_dict(), example_inputs=(x,), rules=rules
    )
    assert report.ok, report
    np.testing.assert_allclose(forward(model, variables, x), run(torch_experts, x), **TOL)
    back = to_torch(model, variables, rules=rules, as_torch=True)
    TorchExperts().load_state_dict(back, strict=True)
    assert_bit_identical(back, torch_experts.state_dict())


# --- wrong rules raise before any tensor is read, naming the rule, the keys and the shapes -----


def test_stacked_keys_of_different_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    gqa_checkpoint = twin(GQA).self_attn.state_dict()  # k and v have 2 heads, q has 4
    forbid_reads(monkeypatch)
    with pytest.raises(RuntimeError) as info:
        from_torch(
            GemmaAttention(MHA), gqa_checkpoint, example_inputs=(_x(MHA),), rules=STACKED_QKV
        )
    message = str(info.value)
    for part in (
        "size mismatch for k_proj.weight: copying a param with shape (4, 8) from checkpoint",
        "at torch '<root>' stacks",
        "Stacked(('q_proj.weight', 'k_proj.weight', 'v_proj.weight'), 'qkv_einsum/w', axis=0, "
        "layout=einsum_layout('BTD,NDH->BTNH'))",
        "into flax variable 'params/qkv_einsum/w' (3, 4, 8, 2), so each must be (8, 8)",
        "q_proj.weight (8, 8), k_proj.weight (4, 8), v_proj.weight (4, 8)",
        "stack k and v: Map('q_proj.weight', 'q/kernel', ...), Stacked(('k_proj.weight', ",
    ):
        assert part in message, message
    # strict=False: the keys that fit do not load a part of the stack; it refuses whole.
    with pytest.raises(
        ValueError, match=re.escape("2 of them do not load: ['k_proj.weight (size mismatch)'")
    ):
        from_torch(
            GemmaAttention(MHA),
            gqa_checkpoint,
            example_inputs=(_x(MHA),),
            rules=STACKED_QKV,
            strict=False,
        )


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            Stacked(QKV_KEYS[:2], "qkv_einsum/w", layout=einsum_layout(Q)),
            "stacks 2 torch keys ['q_proj.weight', 'k_proj.weight'] on axis 0, but flax variable "
            "'params/qkv_einsum/w' has shape (3, 4, 8, 2), whose axis 0 holds 3",
        ),
        (
            Stacked(QKV_KEYS, "qkv_einsum/w", axis=4, layout=einsum_layout(Q)),
            "flax variable 'params/qkv_einsum/w' has shape (3, 4, 8, 2) (4 axes), so it has no axis 4",
        ),
        (
            Stacked(QKV_KEYS, "qkv_einsum/w", layout=LINEAR),
            "gives torch key 'q_proj.weight' from flax variable 'params/qkv_einsum/w' of shape "
            "(3, 4, 8, 2) (its slice (4, 8, 2)), but layout Layout(perm=(1, 0), merge=None, "
            "flip=()) permutes 2 axes",
        ),
    ],
    ids=["key count", "axis", "layout axes"],
)
def test_wrong_stacked_rule(monkeypatch: pytest.MonkeyPatch, entry: Stacked, expected: str) -> None:
    sd = twin(MHA).self_attn.state_dict()
    forbid_reads(monkeypatch)
    rules = {GemmaAttention: Rule(entry, OUT_MAP)}
    with pytest.raises(ValueError) as info:
        from_torch(GemmaAttention(MHA), sd, example_inputs=(_x(MHA),), rules=rules)
    assert "the rule for GemmaAttention at flax scope '<root>'" in str(info.value)
    assert expected in str(info.value), str(info.value)
    assert numpy_state(sd)  # the state dict is untouched
