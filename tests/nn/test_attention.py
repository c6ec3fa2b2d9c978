"""MultiheadAttention against torch.nn.MultiheadAttention on the same weights and inputs."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_registry as fr
from flax_registry.nn.attention import MultiheadAttention
from tests.frontends import Loaded, frontends
from tests.parity import assert_close, assert_state_dict_matches, key
from tests.parity import load_from_torch as from_torch

E, H, L, S, N = 8, 2, 3, 4, 2


def make(**kwargs: Any) -> tuple[Any, Any, torch.nn.MultiheadAttention]:
    torch.manual_seed(0)
    t = torch.nn.MultiheadAttention(E, H, **kwargs)
    m = MultiheadAttention(E, H, **kwargs)
    v = from_torch(m, t)
    if kwargs.get("bias", True):  # torch starts these at zero: make them count
        sd = {k: val.clone() for k, val in t.state_dict().items()}
        sd["in_proj_bias"].normal_()
        sd["out_proj.bias"].normal_()
        t.load_state_dict(sd)
        v = from_torch(m, t)
    return m, v, t


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def inputs(m: Any, batched: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    kdim, vdim = m.kdim or E, m.vdim or E

    def shape(seq: int, dim: int) -> tuple[int, ...]:
        if not batched:
            return (seq, dim)
        return (N, seq, dim) if m.batch_first else (seq, N, dim)

    return rand(*shape(L, E), seed=1), rand(*shape(S, kdim), seed=2), rand(*shape(S, vdim), seed=3)


def tt(x: Any) -> Any:
    return None if x is None else torch.tensor(np.asarray(x))


def compare(
    m: Any, v: Any, t: Any, q: Any, k: Any, val: Any, frontend: str = "linen", **kwargs: Any
) -> None:
    if frontend == "linen":
        out, weights = m.apply(v, q, k, val, **kwargs)
    else:
        out, weights = Loaded(frontend, m, t)(q, k, val, **kwargs)
    t_kwargs = {key: tt(x) if isinstance(x, np.ndarray) else x for key, x in kwargs.items()}
    with torch.no_grad():
        t_out, t_weights = t(tt(q), tt(k), tt(val), **t_kwargs)
    assert out.shape == tuple(t_out.shape)
    assert_close(out, t_out)
    if t_weights is None:
        assert weights is None
    else:
        assert weights.shape == tuple(t_weights.shape)
        assert_close(weights, t_weights)


KPM = np.array([[False, False, True, False], [True, False, False, False]])
BOOL_MASK = np.random.default_rng(5).random((L, S)) > 0.7
CAUSAL = np.triu(np.ones((L, S), bool), 1)

VARIANTS = [
    pytest.param({}, id="packed"),
    pytest.param({"kdim": 5, "vdim": 6}, id="kdim-vdim"),
    pytest.param({"bias": False}, id="nobias"),
    pytest.param({"add_bias_kv": True}, id="bias_kv"),
    pytest.param({"add_zero_attn": True, "kdim": 3}, id="zero_attn-kdim"),
]
CALLS = [
    pytest.param({}, id="plain"),
    pytest.param({"need_weights": False}, id="no-weights"),
    pytest.param({"average_attn_weights": False}, id="per-head"),
    pytest.param({"key_padding_mask": KPM}, id="kpm-bool"),
    pytest.param({"key_padding_mask": np.where(KPM, -1e4, 0.5).astype(np.float32)}, id="kpm-float"),
    pytest.param({"attn_mask": BOOL_MASK, "key_padding_mask": KPM}, id="2d-bool+kpm"),
    pytest.param({"attn_mask": rand(L, S, seed=7)}, id="2d-float"),
    pytest.param(
        {"attn_mask": rand(N * H, L, S, seed=8), "average_attn_weights": False}, id="3d-float"
    ),
    pytest.param({"attn_mask": CAUSAL, "is_causal": True, "need_weights": False}, id="causal"),
    pytest.param({"attn_mask": CAUSAL, "is_causal": True}, id="causal-weights"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_state_dict_matches_torch(variant: dict[str, Any], batch_first: bool) -> None:
    m, v, t = make(batch_first=batch_first, **variant)
    assert_state_dict_matches(m, v, t)
    assert [n for n, _ in fr.named_parameters(m, v)] == [n for n, _ in t.named_parameters()]
    assert [n for n, _ in fr.named_modules(m, v)] == [n for n, _ in t.named_modules()]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("call", CALLS)
@frontends
def test_forward_matches_torch(
    variant: dict[str, Any], call: dict[str, Any], frontend: str
) -> None:
    m, v, t = make(**variant)
    compare(m, v, t, *inputs(m), frontend=frontend, **call)


@pytest.mark.parametrize("call", CALLS[:8:2])
def test_batch_first_matches_torch(call: dict[str, Any]) -> None:
    m, v, t = make(batch_first=True, kdim=5)
    compare(m, v, t, *inputs(m), **call)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param({}, id="plain"),
        pytest.param({"key_padding_mask": KPM[0], "average_attn_weights": False}, id="kpm"),
        pytest.param({"attn_mask": rand(H, L, S, seed=9)}, id="3d-mask"),
        pytest.param({"attn_mask": CAUSAL, "is_causal": True, "need_weights": False}, id="causal"),
    ],
)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_unbatched_input(call: dict[str, Any], batch_first: bool) -> None:
    m, v, t = make(batch_first=batch_first, add_bias_kv=True)
    compare(m, v, t, *inputs(m, batched=False), **call)


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_self_attention_same_array(batch_first: bool, batched: bool) -> None:
    """query is key is value (one packed projection, torch's self-attention path), eval mode."""
    m, v, t = make(batch_first=batch_first)
    x = (rand(N, L, E) if batch_first else rand(L, N, E)) if batched else rand(L, E)
    kpm = KPM[:, :L] if batched else KPM[0, :L]
    t.eval()
    compare(m, v, t, x, x, x, key_padding_mask=kpm)


def test_train_mode_without_dropout_matches_torch_train() -> None:
    m, v, t = make()
    q, k, val = inputs(m)
    out, w = fr.apply(m, v, q, k, val, train=True)[0]
    t.train()
    t_out, t_w = t(tt(q), tt(k), tt(val))
    assert_close(out, t_out.detach())
    assert_close(w, t_w.detach())


def test_dropout_on_attention_weights() -> None:
    m, v, t = make(dropout=0.5)
    q, k, val = inputs(m)
    t.eval()
    compare(m, v, t, q, k, val)  # eval: deterministic, as torch
    eval_out, eval_w = m.apply(v, q, k, val)
    run = lambda rng: m.apply(v, q, k, val, train=True, rngs={"dropout": rng})  # noqa: E731
    (o1, w1), (o2, w2), (o3, _) = (run(key(i)) for i in (1, 1, 2))
    np.testing.assert_array_equal(o1, o2)
    assert not np.allclose(o1, eval_out)
    assert not np.allclose(o1, o3)
    # the returned weights are the dropped ones, as torch's: zeros and survivors * 1/(1-p)
    dropped = {"train": True, "rngs": {"dropout": key(1)}}
    per_head = m.apply(v, q, k, val, average_attn_weights=False, **dropped)[1]
    full = m.apply(v, q, k, val, average_attn_weights=False)[1]
    kept = np.asarray(per_head) != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(np.asarray(per_head)[kept], 2 * np.asarray(full)[kept], rtol=1e-5)
    assert_close(w1, np.asarray(per_head).mean(axis=1))
    with pytest.raises(ValueError, match="no 'dropout' rng was given"):
        m.apply(v, q, k, val, train=True)


def _grad_check(
    m: Any, v: Any, t: Any, q: Any, k: Any, val: Any, frontend: str = "linen", **kwargs: Any
) -> None:
    """Gradients of sum(out * c1) + sum(weights * c2) w.r.t. query, key, value and every
    parameter agree with torch's autograd (one compilation of the whole backward pass)."""
    out, weights = m.apply(v, q, k, val, **kwargs)
    rng = np.random.default_rng(4)
    c1 = rng.standard_normal(out.shape).astype(np.float32)
    c2 = rng.standard_normal(weights.shape).astype(np.float32)
    loaded = Loaded(frontend, m, t)
    loss = lambda ow: jnp.sum(ow[0] * c1) + jnp.sum(ow[1] * c2)  # noqa: E731
    _, input_grads, ours = loaded.value_and_grads(loss, q, k, val, **kwargs)
    ts = [torch.tensor(x, requires_grad=True) for x in (q, k, val)]
    t_kwargs = {key: tt(x) if isinstance(x, np.ndarray) else x for key, x in kwargs.items()}
    t_out, t_w = t(*ts, **t_kwargs)
    ((t_out * torch.tensor(c1)).sum() + (t_w * torch.tensor(c2)).sum()).backward()
    tol = {"rtol": 1e-4, "atol": 1e-5}
    for g, x in zip(input_grads, ts):
        assert_close(g, x.grad, **tol)
    for name, p in t.named_parameters():
        assert_close(ours[name], p.grad, **tol)


@pytest.mark.parametrize("variant", [{}, {"kdim": 5, "vdim": 6, "add_bias_kv": True}])
@frontends
def test_gradients_match_autograd(variant: dict[str, Any], frontend: str) -> None:
    m, v, t = make(batch_first=True, **variant)
    kpm = np.where(KPM, -1e4, 0.0).astype(np.float32)
    _grad_check(
        m, v, t, *inputs(m), frontend=frontend, key_padding_mask=kpm, attn_mask=rand(L, S, seed=6)
    )


def test_default_init_is_torch_distribution() -> None:
    e = 32
    m = MultiheadAttention(e, 4, add_bias_kv=True)
    v = fr.init_variables(m, key(0))
    t = torch.nn.MultiheadAttention(e, 4, add_bias_kv=True)
    assert_state_dict_matches(m, v, t)
    sd = fr.state_dict(m, v)
    assert np.all(np.asarray(sd["in_proj_bias"]) == 0)
    assert np.all(np.asarray(sd["out_proj.bias"]) == 0)
    w = np.asarray(sd["in_proj_weight"])
    bound = math.sqrt(6 / (e + 3 * e))  # xavier_uniform on (3e, e)
    assert np.abs(w).max() <= bound
    assert abs(w.var() / (bound**2 / 3) - 1) < 0.1
    ow = np.asarray(sd["out_proj.weight"])
    assert np.abs(ow).max() <= 1 / math.sqrt(e)  # Linear's kaiming_uniform(a=sqrt(5))
    assert ow.std() > 0.8 / math.sqrt(3 * e)
    bk = np.concatenate([np.ravel(sd["bias_k"]), np.ravel(sd["bias_v"])])
    assert 0.5 < bk.std() * math.sqrt(e) < 1.5  # xavier_normal on (1, 1, e): std 1/sqrt(e)


def _torch_error(fn: Any) -> str:
    """torch's message, with `torch.Size([a, b])` written as the tuple `(a, b)`."""
    with pytest.raises(Exception) as info:
        fn()
    return re.sub(r"torch\.Size\(\[(.*?)\]\)", r"(\1)", str(info.value))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param({"attn_mask": CAUSAL[:, :3], "is_causal": False}, id="2d-mask-shape"),
        pytest.param({"attn_mask": rand(H, L, S)}, id="3d-mask-shape"),
        pytest.param({"attn_mask": None, "is_causal": True}, id="causal-without-mask"),
        pytest.param({"key_padding_mask": KPM[:, :3]}, id="kpm-shape"),
        pytest.param({"key_padding_mask": KPM.astype(np.int32)}, id="kpm-int"),
        pytest.param({"key_padding_mask": KPM[0]}, id="kpm-1d-for-batched"),
    ],
)
def test_bad_arguments_raise_torch_messages(case: dict[str, Any]) -> None:
    m, v, t = make()
    q, k, val = inputs(m)
    t_case = {key: tt(x) if isinstance(x, np.ndarray) else x for key, x in case.items()}
    expected = _torch_error(lambda: t(tt(q), tt(k), tt(val), **t_case))
    with pytest.raises((ValueError, RuntimeError, TypeError)) as info:
        m.apply(v, q, k, val, **case)
    assert str(info.value).startswith(expected)


def test_wrong_embedding_dim_and_constructor_checks() -> None:
    m, v, t = make()
    q = rand(L, N, E + 2)
    expected = _torch_error(lambda: t(tt(q), tt(q), tt(q)))
    with pytest.raises(ValueError, match=expected):
        m.apply(v, q, q, q)
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads"):
        MultiheadAttention(8, 3)
    expected = _torch_error(lambda: torch.nn.MultiheadAttention(0, 2))
    with pytest.raises(ValueError, match=expected):
        MultiheadAttention(0, 2)


def test_mismatched_mask_types_warn_as_torch() -> None:
    m, v, _ = make()
    with pytest.warns(UserWarning, match="Support for mismatched key_padding_mask and attn_mask"):
        m.apply(v, *inputs(m), key_padding_mask=KPM, attn_mask=rand(L, S))


def test_under_jit() -> None:
    m, v, t = make(batch_first=True)
    q, k, val = inputs(m)
    out, w = jax.jit(m.apply)(v, q, k, val, KPM)
    with torch.no_grad():
        t_out, t_w = t(tt(q), tt(k), tt(val), tt(KPM))
    assert_close(out, t_out)
    assert_close(w, t_w)
