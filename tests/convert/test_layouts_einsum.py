"""Einsum-shaped kernels: the layout between a kernel kept for `jnp.einsum(eq, x, kernel)` and
the torch Linear weight follows from the equation. Checked for single equations against
`torch.nn.functional.linear`, and for attention blocks written as JAX codebases write them (a
Gemma-style `Einsum` module with a weight `w` and the equation given at call time; flax's
`nn.Einsum` with a MaxText-style `(e, n, h)` query kernel) against their PyTorch twin."""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_registry.convert import Child, Map, Rule, einsum_layout, from_torch, to_torch
from tests.convert._decoder import Attention, Config, attend, forbid_reads, forward, run, twin
from tests.convert._helpers import assert_bit_identical
from tests.parity import TOL

C = Config(layers=0)
Q, KV, OUT = "BTD,NDH->BTNH", "BSD,KDH->BSKH", "BTNH,NHD->BTD"


def _x(c: Config = C, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 5, c.hidden)).astype(np.float32)


def _attention_twin(c: Config) -> torch.nn.Module:
    return twin(c).self_attn


# --- one equation at a time, against torch.nn.functional.linear -------------------------------

EQUATIONS = [
    # (equation, kernel shape, input shape, role, kernel operand)
    ("BTD,NDH->BTNH", (4, 6, 3), (2, 5, 6), "weight", 1),  # Gemma's query
    ("BTNH,NHD->BTD", (4, 3, 6), (2, 5, 4, 3), "weight", 1),  # Gemma's attention output
    ("BTE,ENH->BTNH", (6, 4, 3), (2, 5, 6), "weight", 1),  # MaxText's query (e, n, h)
    ("...D,DF->...F", (6, 7), (2, 5, 6), "weight", 1),  # a plain Dense, with an ellipsis
    ("NDH,BTD->BTNH", (4, 6, 3), (2, 5, 6), "weight", 0),  # kernel first
    ("BTD,NDH->BTNH", (4, 6, 3), (2, 5, 6), "weight_in_out", 1),  # a Conv1D-style (in, out)
]


def _flat(a: np.ndarray, spec: str, kernel: str) -> np.ndarray:
    """`a` (axes named by `spec`) as (rows, features): the axes not in the kernel first, the
    kernel's axes flattened last, in `spec`'s order (torch's view of the same numbers)."""
    spec = spec.replace("...", "")
    lead = a.ndim - len(spec)  # the axes an ellipsis stands for, leading
    rows = [c for c in spec if c not in kernel]
    feats = [c for c in spec if c in kernel]
    axes = [*range(lead), *(lead + spec.index(c) for c in rows + feats)]
    return np.transpose(a, axes).reshape(
        -1, math.prod(a.shape[lead + spec.index(c)] for c in feats)
    )


@pytest.mark.parametrize(("eq", "shape", "x_shape", "role", "kernel"), EQUATIONS)
def test_einsum_layout_is_the_linear_layer(
    eq: str, shape: tuple[int, ...], x_shape: tuple[int, ...], role: Any, kernel: int
) -> None:
    rng = np.random.default_rng(0)
    inputs, out = eq.split("->")
    spec, inp = inputs.split(",")[kernel], inputs.split(",")[1 - kernel]
    n_in = math.prod(n for c, n in zip(spec, shape, strict=True) if c in inp)
    n_out = math.prod(n for c, n in zip(spec, shape, strict=True) if c in out)
    torch_shape = (n_out, n_in) if role == "weight" else (n_in, n_out)
    weight = rng.standard_normal(torch_shape).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    layout = einsum_layout(eq, role, kernel=kernel)
    k = layout.to_flax(weight, shape)
    assert layout.to_torch(np.ascontiguousarray(k)).tobytes() == weight.tobytes()
    out_kernel_axes = tuple(n for c, n in zip(spec, shape, strict=True) if c in out)
    b = einsum_layout(eq, "bias", kernel=kernel).to_flax(bias, out_kernel_axes)
    x = rng.standard_normal(x_shape).astype(np.float32)
    operands = (x, k) if kernel == 1 else (k, x)
    y = np.asarray(jnp.einsum(eq, *operands))
    named = out.replace("...", "")  # y's last axes; an ellipsis stands for the leading ones
    lead = y.ndim - len(named)
    y = y + np.reshape(
        b, [1] * lead + [y.shape[lead + i] if c in spec else 1 for i, c in enumerate(named)]
    )
    w = torch.from_numpy(weight if role == "weight" else weight.T.copy())
    expected = torch.nn.functional.linear(
        torch.from_numpy(_flat(x, inp, spec)), w, torch.from_numpy(bias)
    ).numpy()
    np.testing.assert_allclose(_flat(y, out, spec), expected, **TOL)


@pytest.mark.parametrize(
    ("eq", "match"),
    [
        ("BTNH,NHK->BTNK", re.escape("batch axes ['N']")),
        ("BTD,DFG->BTF", r"axes \['G'\] only the kernel has"),
        ("BTD,NDH", "must be explicit with two operands"),
        ("BTD,ND...->BTN", "has an ellipsis"),
    ],
)
def test_einsum_layout_refuses_what_is_not_a_linear_layer(eq: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        einsum_layout(eq)


# --- a Gemma-style attention block: `Einsum` modules holding `w`, equations at call time --------


class Einsum(nn.Module):
    """gemma/modules.py's parametrized einsum: one weight `w`, the equation given per call."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        return jnp.einsum(eqn, x, self.param("w", nn.initializers.normal(), self.shape))


class GemmaAttention(nn.Module):
    c: Config

    def setup(self) -> None:
        c = self.c
        self.q_einsum = Einsum((c.heads, c.hidden, c.head_dim))
        self.k_einsum = Einsum((c.kv_heads, c.hidden, c.head_dim))
        self.v_einsum = Einsum((c.kv_heads, c.hidden, c.head_dim))
        self.attn_vec_einsum = Einsum((c.heads, c.head_dim, c.hidden))

    def __call__(self, x: jax.Array) -> jax.Array:
        q = self.q_einsum(Q, x)
        k, v = self.k_einsum(KV, x), self.v_einsum(KV, x)
        return self.attn_vec_einsum(OUT, attend(q, k, v))


def w(eq: str) -> Rule:
    """The rule of one Gemma `Einsum`: its `w` is a Linear weight laid out by `eq`."""
    return Rule(Map("weight", "w", layout=einsum_layout(eq)))


GEMMA_ATTENTION = {
    GemmaAttention: Rule(
        Child("q_proj", "q_einsum", w(Q)),
        Child("k_proj", "k_einsum", w(KV)),
        Child("v_proj", "v_einsum", w(KV)),
        Child("o_proj", "attn_vec_einsum", w(OUT)),
    )
}


def test_gemma_style_einsum_attention_from_its_twin() -> None:
    torch_attn = _attention_twin(C)
    x = _x()
    model = GemmaAttention(C)
    variables, report = from_torch(
        model, torch_attn.state_dict(), example_inputs=(x,), rules=GEMMA_ATTENTION
    )
    assert report.ok, report
    assert variables["params"]["q_einsum"]["w"].shape == (C.heads, C.hidden, C.head_dim)
    assert variables["params"]["attn_vec_einsum"]["w"].shape == (C.heads, C.head_dim, C.hidden)
    np.testing.assert_allclose(forward(model, variables, x), run(torch_attn, x), **TOL)
    back = to_torch(model, variables, rules=GEMMA_ATTENTION, as_torch=True)
    Attention(C).load_state_dict(back, strict=True)
    assert_bit_identical(back, torch_attn.state_dict())


class PathNamedAttention(GemmaAttention):
    """The same class used in four layouts, under torch's names: rules by path."""

    def setup(self) -> None:
        c = self.c
        self.q_proj = Einsum((c.heads, c.hidden, c.head_dim))
        self.k_proj = Einsum((c.kv_heads, c.hidden, c.head_dim))
        self.v_proj = Einsum((c.kv_heads, c.hidden, c.head_dim))
        self.o_proj = Einsum((c.heads, c.head_dim, c.hidden))

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self.q_proj(Q, x), self.k_proj(KV, x), self.v_proj(KV, x)
        return self.o_proj(OUT, attend(q, k, v))


def test_one_class_in_several_layouts_takes_rules_by_path() -> None:
    torch_attn = _attention_twin(C)
    x = _x()
    model = PathNamedAttention(C)
    rules = {"q_proj": w(Q), "[kv]_proj": w(KV), "*o_proj": w(OUT)}
    variables, report = from_torch(model, torch_attn.state_dict(), example_inputs=(x,), rules=rules)
    assert report.ok, report
    np.testing.assert_allclose(forward(model, variables, x), run(torch_attn, x), **TOL)
    assert_bit_identical(to_torch(model, variables, rules=rules), torch_attn.state_dict())
    # Patterns are globs over torch module names: a module none matches has no rule (its raw
    # `w` would load unchanged from 'o_proj.w'), so the checkpoint's key does not fit.
    partial = {"q_proj": w(Q), "[kv]_proj": w(KV)}
    with pytest.raises(RuntimeError, match='Missing key.*"o_proj.w"'):
        from_torch(model, torch_attn.state_dict(), example_inputs=(x,), rules=partial)


# --- flax's nn.Einsum, MaxText-style kernels (e, n, h) and (n, h, e): no rule at all -----------


class MaxTextAttention(nn.Module):
    c: Config

    def setup(self) -> None:
        c = self.c
        e, n, k, h = c.hidden, c.heads, c.kv_heads, c.head_dim
        bias = c.qkv_bias
        self.q_proj = nn.Einsum((e, n, h), "BTE,ENH->BTNH", use_bias=bias)
        self.k_proj = nn.Einsum((e, k, h), "BSE,EKH->BSKH", use_bias=bias)
        self.v_proj = nn.Einsum((e, k, h), "BSE,EKH->BSKH", use_bias=bias)
        self.o_proj = nn.Einsum((n, h, e), "BTNH,NHE->BTE", use_bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.o_proj(attend(self.q_proj(x), self.k_proj(x), self.v_proj(x)))


def test_flax_einsum_layers_follow_their_equation() -> None:
    c = Config(layers=0, qkv_bias=True)
    torch_attn = _attention_twin(c)
    x = _x(c)
    model = MaxTextAttention(c)
    variables, report = from_torch(model, torch_attn.state_dict(), example_inputs=(x,))
    assert report.ok, report
    assert variables["params"]["q_proj"]["kernel"].shape == (c.hidden, c.heads, c.head_dim)
    assert variables["params"]["q_proj"]["bias"].shape == (c.heads, c.head_dim)
    np.testing.assert_allclose(forward(model, variables, x), run(torch_attn, x), **TOL)
    back = to_torch(model, variables, as_torch=True)
    Attention(c).load_state_dict(back, strict=True)
    assert_bit_identical(back, torch_attn.state_dict())


# --- wrong rules raise before any tensor is read ----------------------------------------------


def test_wrong_axis_count_names_the_rule_key_and_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    torch_attn = _attention_twin(C)
    forbid_reads(monkeypatch)
    rules = {
        GemmaAttention: Rule(
            *GEMMA_ATTENTION[GemmaAttention].entries[:3],
            Child("o_proj", "attn_vec_einsum", w("BTD,DF->BTF")),
        )
    }
    with pytest.raises(ValueError) as info:
        from_torch(GemmaAttention(C), torch_attn.state_dict(), example_inputs=(_x(),), rules=rules)
    message = str(info.value)
    for part in (
        "Map('weight', 'w', layout=einsum_layout('BTD,DF->BTF'))",
        "torch key 'o_proj.weight'",
        "'params/attn_vec_einsum/w' of shape (4, 2, 8)",
        "permutes 2 axes",
    ):
        assert part in message, message


def test_equation_given_at_call_time_needs_a_rule() -> None:
    class CallTime(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            return nn.Einsum((8, 4, 2), name="q_proj")(x, "BTE,ENH->BTNH")

    sd = {"q_proj.weight": np.zeros((8, 8), np.float32), "q_proj.bias": np.zeros(8, np.float32)}
    with pytest.raises(ValueError, match="its layout cannot be derived: give the rule"):
        from_torch(CallTime(), sd, example_inputs=(_x(),))
    rule = Rule(
        Map("weight", "kernel", layout=einsum_layout("BTE,ENH->BTNH")),
        Map("bias", "bias", layout=einsum_layout("BTE,ENH->BTNH", "bias")),
    )
    variables, report = from_torch(CallTime(), sd, example_inputs=(_x(),), rules={"q_proj": rule})
    assert report.ok and variables["params"]["q_proj"]["kernel"].shape == (8, 4, 2)
