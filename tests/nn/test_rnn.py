"""LSTM and GRU against torch.nn.LSTM / torch.nn.GRU on the same weights and inputs."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_registry as fr
from flax_registry.nn.rnn import GRU, LSTM
from tests.frontends import Loaded, frontends
from tests.parity import (
    assert_close,
    assert_state_dict_keys_match,
    assert_state_dict_matches,
    key,
    to_numpy,
)
from tests.parity import load_from_torch as from_torch

PAIRS = {"LSTM": (LSTM, torch.nn.LSTM), "GRU": (GRU, torch.nn.GRU)}
IN, HID, T, N = 3, 4, 4, 2


def make(kind: str, **kwargs: Any) -> tuple[Any, Any, torch.nn.Module]:
    ours, theirs = PAIRS[kind]
    torch.manual_seed(0)
    t = theirs(IN, HID, **kwargs)
    m = ours(IN, HID, **kwargs)
    return m, from_torch(m, t), t


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def flat(result: Any) -> list[Any]:
    """(output, h_n) or (output, (h_n, c_n)) as a flat list."""
    out, state = result
    return [out, *state] if isinstance(state, tuple) else [out, state]


def initial_state(kind: str, m: Any, batch: int | None, seed: int = 1) -> Any:
    rows = m.num_layers * (2 if m.bidirectional else 1)
    lead = (rows,) if batch is None else (rows, batch)
    h = rand(*lead, getattr(m, "proj_size", 0) or HID, seed=seed)
    return (h, rand(*lead, HID, seed=seed + 1)) if kind == "LSTM" else h


def as_torch(state: Any) -> Any:
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(torch.tensor(s) for s in state)
    return torch.tensor(state)


CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param({"batch_first": True}, id="batch_first"),
    pytest.param({"num_layers": 2, "bidirectional": True}, id="2layers-bidir"),
    pytest.param({"bias": False, "bidirectional": True}, id="nobias-bidir"),
    pytest.param({"num_layers": 2, "batch_first": True, "bias": False}, id="2layers-bf-nobias"),
]


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
@frontends
def test_forward_matches_torch(
    kind: str, config: dict[str, Any], with_hx: bool, frontend: str
) -> None:
    m, v, t = make(kind, **config)
    loaded = Loaded(frontend, m, t)
    assert_state_dict_keys_match(loaded.state_dict(), t)
    x = rand(N, T, IN) if config.get("batch_first") else rand(T, N, IN)
    hx = initial_state(kind, m, N) if with_hx else None
    ours = flat(loaded(x, hx))
    with torch.no_grad():
        theirs = flat(t(torch.tensor(x), as_torch(hx)))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == tuple(b.shape)
        assert_close(a, b)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
def test_unbatched_input(kind: str, with_hx: bool) -> None:
    m, v, t = make(kind, num_layers=2, bidirectional=True, batch_first=True)
    x = rand(T, IN)
    hx = initial_state(kind, m, None) if with_hx else None
    ours = flat(m.apply(v, x, hx))
    with torch.no_grad():
        theirs = flat(t(torch.tensor(x), as_torch(hx)))
    for a, b in zip(ours, theirs):
        assert a.shape == tuple(b.shape)
        assert_close(a, b)


TORCH_PROJ_WARNING = "ignore:LSTM with projections is not supported with oneDNN"


@pytest.mark.filterwarnings(TORCH_PROJ_WARNING)
@pytest.mark.parametrize("config", [{}, {"num_layers": 2, "bidirectional": True}])
def test_lstm_proj_size(config: dict[str, Any]) -> None:
    m, v, t = make("LSTM", proj_size=2, **config)
    assert_state_dict_matches(m, v, t)
    x, hx = rand(T, N, IN), initial_state("LSTM", m, N)
    ours = flat(m.apply(v, x, hx))
    with torch.no_grad():
        theirs = flat(t(torch.tensor(x), as_torch(hx)))
    for a, b in zip(ours, theirs):
        assert a.shape == tuple(b.shape)
        assert_close(a, b)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_train_mode_without_dropout_matches_torch_train(kind: str) -> None:
    m, v, t = make(kind, num_layers=2)
    x = rand(T, N, IN)
    ours = flat(fr.apply(m, v, x, train=True)[0])
    t.train()
    theirs = flat(t(torch.tensor(x)))
    for a, b in zip(ours, theirs):
        assert_close(a, b.detach())


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_dropout_between_layers(kind: str) -> None:
    m, v, t = make(kind, num_layers=2, dropout=0.5)
    x = rand(T, N, IN)
    eval_out = flat(m.apply(v, x))
    t.eval()
    with torch.no_grad():
        for a, b in zip(eval_out, flat(t(torch.tensor(x)))):
            assert_close(a, b)
    run = lambda rng: flat(m.apply(v, x, train=True, rngs={"dropout": rng}))  # noqa: E731
    first, again, other = run(key(1)), run(key(1)), run(key(2))
    assert not np.allclose(first[0], eval_out[0])
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.allclose(first[0], other[0])
    # dropout acts between layers only: the first layer's final state is untouched
    np.testing.assert_allclose(first[1][0], eval_out[1][0], rtol=1e-6)
    with pytest.raises(ValueError, match="no 'dropout' rng was given"):
        m.apply(v, x, train=True)


def _check_grads(
    kind: str, m: Any, v: Any, t: torch.nn.Module, x: np.ndarray, hx: Any, frontend: str
) -> None:
    """d(sum of every output * a fixed cotangent) w.r.t. input, hx and all parameters."""
    outs = flat(m.apply(v, x, hx))
    rng = np.random.default_rng(3)
    cots = [rng.standard_normal(o.shape).astype(np.float32) for o in outs]
    loss = lambda res: sum(jnp.sum(o * c) for o, c in zip(flat(res), cots))  # noqa: E731
    _, (g_x, g_hx), ours = Loaded(frontend, m, t).value_and_grads(loss, x, hx)
    tx = torch.tensor(x, requires_grad=True)
    thx = as_torch(hx)
    for s in thx if isinstance(thx, tuple) else (thx,):
        s.requires_grad_(True)
    res = flat(t(tx, thx))
    sum((o * torch.tensor(c)).sum() for o, c in zip(res, cots)).backward()
    tol = {"rtol": 1e-4, "atol": 1e-5}
    assert_close(g_x, tx.grad, **tol)
    for ours_h, theirs_h in zip(
        g_hx if isinstance(g_hx, tuple) else (g_hx,), thx if isinstance(thx, tuple) else (thx,)
    ):
        assert_close(ours_h, theirs_h.grad, **tol)
    names = [name for name, _ in t.named_parameters()]
    assert list(ours) == names
    for name, p in t.named_parameters():
        assert_close(ours[name], p.grad, **tol)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@frontends
def test_gradients_match_autograd(kind: str, frontend: str) -> None:
    m, v, t = make(kind, num_layers=2, bidirectional=True, batch_first=True)
    _check_grads(kind, m, v, t, rand(N, T, IN), initial_state(kind, m, N), frontend)


@pytest.mark.filterwarnings(TORCH_PROJ_WARNING)
@frontends
def test_gradients_lstm_proj(frontend: str) -> None:
    m, v, t = make("LSTM", proj_size=2)
    _check_grads("LSTM", m, v, t, rand(T, N, IN), initial_state("LSTM", m, N), frontend)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_default_init_is_torch_distribution(kind: str) -> None:
    """Every parameter ~ U(-1/sqrt(hidden), 1/sqrt(hidden)), as RNNBase.reset_parameters."""
    ours, theirs = PAIRS[kind]
    m = ours(IN, 16, num_layers=2)
    v = fr.init_variables(m, key(0))
    t = theirs(IN, 16, num_layers=2)
    assert_state_dict_matches(m, v, t)
    bound = 1 / math.sqrt(16)
    values = np.concatenate([np.ravel(a) for a in fr.state_dict(m, v).values()])
    assert np.all(np.abs(values) <= bound)
    # the uniform's mean and variance (bound^2 / 3) over ~2k draws
    assert abs(values.mean()) < 0.05 * bound
    assert abs(values.var() / (bound**2 / 3) - 1) < 0.1


def test_gate_order_gru_new_gate() -> None:
    """torch's GRU new gate multiplies r into (W_hn h + b_hn): a b_hn-only change must act
    through r, which a (W_hn h) + b_hn formula would get wrong."""
    m, v, t = make("GRU")
    sd = {k: to_numpy(val).copy() for k, val in t.state_dict().items()}
    sd["bias_hh_l0"][2 * HID :] += 3.0
    t.load_state_dict({k: torch.tensor(val) for k, val in sd.items()})
    v, _ = fr.load_state_dict(m, v, sd)
    x = rand(T, N, IN)
    with torch.no_grad():
        expected = t(torch.tensor(x))[0]
    assert_close(m.apply(v, x)[0], expected)


def _torch_message(fn: Any) -> str:
    with pytest.raises(Exception) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_bad_inputs_raise_torch_messages(kind: str) -> None:
    m, v, t = make(kind, num_layers=2)
    cases: list[tuple[Any, Any]] = [
        (rand(T, N, IN + 1), None),
        (rand(2, T, N, IN), None),
        (rand(T, N, IN), initial_state(kind, m, N + 1)),
        (rand(T, IN), initial_state(kind, m, N)),
    ]
    for x, hx in cases:
        expected = _torch_message(lambda: t(torch.tensor(x), as_torch(hx)))
        with pytest.raises((RuntimeError, ValueError)) as info:
            m.apply(v, x, hx)
        assert str(info.value) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dropout": 1.5},
        {"num_layers": 0},
        {"proj_size": HID},
        {"bias": 1},
    ],
)
def test_constructor_checks_match_torch(kwargs: dict[str, Any]) -> None:
    expected = _torch_message(lambda: torch.nn.LSTM(IN, HID, **kwargs))
    with pytest.raises((ValueError, TypeError), match=expected.replace("[", r"\[")):
        LSTM(IN, HID, **kwargs)


def test_dropout_with_one_layer_warns_as_torch() -> None:
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        GRU(IN, HID, dropout=0.2)


def test_jit_and_scan_under_jit() -> None:
    m, v, t = make("LSTM", bidirectional=True)
    x = rand(T, N, IN)
    out, (h, c) = jax.jit(m.apply)(v, x)
    with torch.no_grad():
        t_out, (t_h, t_c) = t(torch.tensor(x))
    assert_close(out, t_out)
    assert_close(h, t_h)
    assert_close(c, t_c)
