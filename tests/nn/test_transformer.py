"""TransformerEncoderLayer / TransformerEncoder against torch on the same weights and inputs."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_registry as fr
from flax_registry.nn.activation import GELU
from flax_registry.nn.normalization import LayerNorm
from flax_registry.nn.transformer import TransformerEncoder, TransformerEncoderLayer
from tests.frontends import Loaded, frontends
from tests.parity import assert_close, assert_state_dict_keys_match, assert_state_dict_matches, key
from tests.parity import load_from_torch as from_torch

D, NHEAD, FF, L, N = 8, 2, 16, 3, 2


def perturbed(t: torch.nn.Module) -> torch.nn.Module:
    """Give torch's zero / one initialised biases and norms random values, so they count."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return t


def make_layer(dropout: float = 0.0, **kwargs: Any) -> tuple[Any, Any, torch.nn.Module]:
    torch.manual_seed(0)
    t = perturbed(torch.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=dropout, **kwargs))
    t.eval()
    m = TransformerEncoderLayer(D, NHEAD, FF, dropout=dropout, **kwargs)
    return m, from_torch(m, t), t


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def src(batch_first: bool, batched: bool = True) -> np.ndarray:
    if not batched:
        return rand(L, D)
    return rand(N, L, D) if batch_first else rand(L, N, D)


def tt(x: Any) -> Any:
    return torch.tensor(x) if isinstance(x, np.ndarray) else x


KPM = np.array([[False, False, True], [False, True, False]])
CAUSAL = np.triu(np.ones((L, L), bool), 1)
FLOAT_CAUSAL = np.triu(np.full((L, L), -np.inf, np.float32), 1)

CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param({"batch_first": True}, id="batch_first"),
    pytest.param({"norm_first": True, "activation": "gelu"}, id="norm_first-gelu"),
    pytest.param({"bias": False, "layer_norm_eps": 1e-3}, id="nobias-eps"),
    pytest.param({"activation": jax.nn.sigmoid}, id="callable"),
]
CALLS = [
    pytest.param({}, id="plain"),
    pytest.param({"src_key_padding_mask": KPM}, id="kpm"),
    pytest.param({"src_mask": CAUSAL, "is_causal": True}, id="causal-hint"),
    pytest.param(
        {
            "src_mask": FLOAT_CAUSAL,
            "src_key_padding_mask": np.where(KPM, -1e9, 0.0).astype(np.float32),
        },
        id="float-masks",
    ),
]


def torch_activation(config: dict[str, Any]) -> dict[str, Any]:
    act = config.get("activation")
    return {**config, "activation": torch.sigmoid} if callable(act) else config


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("call", CALLS)
@frontends
def test_layer_matches_torch(config: dict[str, Any], call: dict[str, Any], frontend: str) -> None:
    torch.manual_seed(0)
    t = perturbed(torch.nn.TransformerEncoderLayer(D, NHEAD, FF, **torch_activation(config)))
    t.eval()
    m = TransformerEncoderLayer(D, NHEAD, FF, **config)
    x = src(config.get("batch_first", False))
    out = Loaded(frontend, m, t)(x, **call)
    with torch.no_grad():
        expected = t(tt(x), **{k: tt(a) for k, a in call.items()})
    assert_close(out, expected)


def test_layer_state_dict_and_modules_match_torch() -> None:
    m, v, t = make_layer(bias=False)
    assert_state_dict_matches(m, v, t)
    assert [n for n, _ in fr.named_modules(m, v)] == [n for n, _ in t.named_modules()]
    assert [n for n, _ in fr.named_parameters(m, v)] == [n for n, _ in t.named_parameters()]


def test_module_activation_is_a_child_as_in_torch() -> None:
    torch.manual_seed(0)
    t = perturbed(torch.nn.TransformerEncoderLayer(D, NHEAD, FF, activation=torch.nn.GELU()))
    t.eval()
    m = TransformerEncoderLayer(D, NHEAD, FF, activation=GELU())
    v = from_torch(m, t)
    assert [n for n, _ in fr.named_modules(m, v)] == [n for n, _ in t.named_modules()]
    x = src(False)
    with torch.no_grad():
        assert_close(m.apply(v, x), t(tt(x)))


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_layer_unbatched(batch_first: bool) -> None:
    m, v, t = make_layer(batch_first=batch_first)
    x = src(batch_first, batched=False)
    with torch.no_grad():
        expected = t(tt(x), src_key_padding_mask=tt(KPM[0]))
    assert_close(m.apply(v, x, src_key_padding_mask=KPM[0]), expected)


@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_train_mode_dropout_zero_and_grads(norm_first: bool) -> None:
    """train=True with dropout=0 is torch's train mode; input and parameter gradients agree."""
    m, v, t = make_layer(norm_first=norm_first, batch_first=True)
    x = src(True)
    cot = rand(*x.shape, seed=3)

    def loss(params: Any, x: Any) -> Any:
        out = m.apply({**v, "params": params}, x, src_key_padding_mask=KPM, train=True)
        return jnp.sum(out * cot)

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(v["params"], x)
    t.train()
    tx = torch.tensor(x, requires_grad=True)
    (t(tx, src_key_padding_mask=tt(KPM)) * torch.tensor(cot)).sum().backward()
    tol = {"rtol": 1e-4, "atol": 1e-5}
    assert_close(g_x, tx.grad, **tol)
    ours = dict(fr.named_parameters(m, {**v, "params": g_params}))
    for name, p in t.named_parameters():
        assert_close(ours[name], p.grad, **tol)


def test_layer_dropout() -> None:
    m, v, t = make_layer(dropout=0.3)
    x = src(False)
    with torch.no_grad():
        assert_close(m.apply(v, x), t(tt(x)))  # eval: deterministic, as torch
    run = lambda rng: m.apply(v, x, train=True, rngs={"dropout": rng})  # noqa: E731
    a, b, c = run(key(0)), run(key(0)), run(key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, m.apply(v, x))
    assert not np.allclose(a, c)


def test_bad_activation_raises_torch_message() -> None:
    with pytest.raises(RuntimeError, match="activation should be relu/gelu, not tanh"):
        TransformerEncoderLayer(D, NHEAD, activation="tanh")


def make_encoder(norm: bool) -> tuple[Any, Any, torch.nn.Module]:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0)
    with warnings.catch_warnings():  # enable_nested_tensor with batch_first=False
        warnings.simplefilter("ignore")
        t = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(D) if norm else None)
    t = perturbed(t)
    t.eval()
    m = TransformerEncoder(
        TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0), 2, norm=LayerNorm(D) if norm else None
    )
    return m, from_torch(m, t), t


@pytest.mark.parametrize("norm", [False, True], ids=["no-norm", "norm"])
@frontends
def test_encoder_matches_torch(norm: bool, frontend: str) -> None:
    m, v, t = make_encoder(norm)
    assert_state_dict_matches(m, v, t)
    assert [n for n, _ in fr.named_modules(m, v)] == [n for n, _ in t.named_modules()]
    loaded = Loaded(frontend, m, t)
    assert_state_dict_keys_match(loaded.state_dict(), t)
    x = src(False)
    for call in ({}, {"src_key_padding_mask": KPM}, {"mask": CAUSAL, "is_causal": True}):
        out = loaded(x, **call)
        # grad enabled: torch's nested-tensor fast path (zeros at padded positions) is off
        expected = t(tt(x), **{k: tt(a) for k, a in call.items()})
        assert_close(out, expected.detach())


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_encoder_layers_are_initialised_independently() -> None:
    m = TransformerEncoder(TransformerEncoderLayer(D, NHEAD, FF), 2)
    sd = fr.state_dict(m, fr.init_variables(m, key(0)))
    t = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(D, NHEAD, FF), 2)
    assert list(sd) == list(t.state_dict())
    assert not np.allclose(sd["layers.0.linear1.weight"], sd["layers.1.linear1.weight"])
