"""BatchNorm*, InstanceNorm*, LayerNorm and GroupNorm against PyTorch, number for number.

Every torch layer gets random weights and random running statistics (and a random
`num_batches_tracked`), its state_dict is loaded strictly with no renaming, and both see the
same inputs: outputs, running statistics after each of several train-mode passes, and
gradients must agree.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_registry as fr
from flax_registry import nn as frnn
from tests.frontends import Loaded, frontends
from tests.parity import (
    assert_buffers_match,
    assert_close,
    assert_named_buffers_match,
    assert_state_dict_keys_match,
    assert_state_dict_matches,
    load_from_torch,
    to_numpy,
    torch_state,
)

Config = tuple[str, dict[str, Any], tuple[int, ...]]

# Configurations of one layer share an input shape where they can: eager JAX compiles each
# operation once per shape, so shared shapes keep the file fast.
BATCH_NORM: list[Config] = [
    ("BatchNorm1d", {"num_features": 3}, (4, 3)),
    ("BatchNorm1d", {"num_features": 3, "momentum": 0.3, "affine": False}, (4, 3)),
    ("BatchNorm1d", {"num_features": 3, "momentum": None}, (2, 3, 5)),
    ("BatchNorm1d", {"num_features": 3, "track_running_stats": False}, (2, 3, 5)),
    ("BatchNorm2d", {"num_features": 3}, (2, 3, 3, 3)),
    ("BatchNorm2d", {"num_features": 3, "momentum": None, "eps": 1e-3}, (2, 3, 3, 3)),
    ("BatchNorm2d", {"num_features": 3, "momentum": 0.3, "bias": False}, (2, 3, 3, 3)),
    ("BatchNorm2d", {"num_features": 3, "affine": False, "track_running_stats": False}, (2, 3, 3, 3)),
    ("BatchNorm3d", {"num_features": 2, "momentum": 0.3}, (2, 2, 2, 2, 3)),
    ("BatchNorm3d", {"num_features": 2, "momentum": None, "affine": False}, (2, 2, 2, 2, 3)),
]  # fmt: skip
INSTANCE_NORM: list[Config] = [
    ("InstanceNorm1d", {"num_features": 3}, (2, 3, 5)),
    ("InstanceNorm1d", {"num_features": 3, "affine": True, "track_running_stats": True}, (2, 3, 5)),
    ("InstanceNorm1d", {"num_features": 3, "track_running_stats": True, "momentum": 0.3}, (3, 5)),
    ("InstanceNorm1d", {"num_features": 3, "affine": True, "eps": 1e-3}, (3, 5)),
    ("InstanceNorm2d", {"num_features": 3, "affine": True, "track_running_stats": True,
                        "momentum": None}, (2, 3, 3, 3)),
    ("InstanceNorm2d", {"num_features": 3, "affine": True, "bias": False}, (2, 3, 3, 3)),
    ("InstanceNorm2d", {"num_features": 3, "track_running_stats": True}, (3, 3, 3)),
    ("InstanceNorm3d", {"num_features": 2, "affine": True, "track_running_stats": True,
                        "momentum": 0.3}, (2, 2, 2, 2, 3)),
]  # fmt: skip
STATELESS: list[Config] = [
    ("LayerNorm", {"normalized_shape": 4}, (2, 3, 4)),
    ("LayerNorm", {"normalized_shape": (3, 4)}, (2, 3, 4)),
    ("LayerNorm", {"normalized_shape": [3, 4], "elementwise_affine": False}, (2, 3, 4)),
    ("LayerNorm", {"normalized_shape": 4, "bias": False, "eps": 1e-3}, (2, 3, 4)),
    ("GroupNorm", {"num_groups": 2, "num_channels": 4}, (2, 4, 3)),
    ("GroupNorm", {"num_groups": 2, "num_channels": 4, "bias": False}, (2, 4, 3)),
    ("GroupNorm", {"num_groups": 2, "num_channels": 4, "affine": False}, (2, 4, 3)),
    ("GroupNorm", {"num_groups": 2, "num_channels": 4, "eps": 1e-3}, (2, 4, 1, 3)),
    ("GroupNorm", {"num_groups": 4, "num_channels": 4}, (2, 4, 3)),
    ("GroupNorm", {"num_groups": 1, "num_channels": 4}, (2, 4, 3)),
]
STATEFUL = BATCH_NORM + INSTANCE_NORM
ALL = STATEFUL + STATELESS


def _id(config: Config) -> str:
    name, kwargs, shape = config
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{name}({args})-{'x'.join(map(str, shape))}"


def configs(items: list[Config]) -> Any:
    return pytest.mark.parametrize("config", items, ids=[_id(c) for c in items])


def make_pair(config: Config, seed: int = 0) -> tuple[Any, torch.nn.Module]:
    """Our layer and torch's, the torch one with random weights and running statistics."""
    name, kwargs, _ = config
    ours = getattr(frnn, name)(**kwargs)
    theirs = getattr(torch.nn, name)(**kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in theirs.named_parameters():
            offset = 1.0 if pname == "weight" else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + offset)
        for bname, b in theirs.named_buffers():
            if bname == "running_mean":
                b.copy_(torch.randn(b.shape, generator=g))
            elif bname == "running_var":
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            else:
                b.fill_(int(torch.randint(1, 9, (), generator=g)))
    return ours, theirs


def inputs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape) * 2.0 + 0.5
    return x.astype(np.float32)


def load(ours: Any, theirs: torch.nn.Module) -> dict[str, Any]:
    variables = load_from_torch(ours, theirs)
    return {"params": {}, **variables}  # layers without parameters have no 'params' at all


def torch_call(theirs: torch.nn.Module, x: np.ndarray, train: bool) -> torch.Tensor:
    theirs.train(train)
    with torch.no_grad():
        return theirs(torch.tensor(x))


# --- construction -------------------------------------------------------------------------


@configs(ALL)
def test_fresh_layer_matches_a_fresh_torch_layer(config: Config) -> None:
    name, kwargs, _ = config
    ours = getattr(frnn, name)(**kwargs)
    theirs = getattr(torch.nn, name)(**kwargs)
    variables = fr.init_variables(ours, jax.random.key(0))
    assert_state_dict_matches(ours, variables, theirs)
    ours_sd = fr.state_dict(ours, variables)
    for key, value in torch_state(theirs).items():
        np.testing.assert_array_equal(np.asarray(ours_sd[key]), value, err_msg=key)
    assert [k for k, _ in fr.named_parameters(ours, variables)] == [
        k for k, _ in theirs.named_parameters()
    ]
    assert [k for k, _ in fr.named_buffers(ours, variables)] == [
        k for k, _ in theirs.named_buffers()
    ]


def test_num_batches_tracked_is_an_integer_buffer() -> None:
    ours = frnn.BatchNorm2d(3)
    variables = fr.init_variables(ours, jax.random.key(0))
    counter = variables["buffers"]["num_batches_tracked"]
    assert counter.shape == () and jnp.issubdtype(counter.dtype, jnp.integer)
    assert "num_batches_tracked" not in variables["params"]


def test_factory_dtype_as_torch() -> None:
    ours = frnn.BatchNorm2d(3, dtype=jnp.bfloat16)
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.bfloat16)
    variables = load(ours, theirs)
    theirs_sd = torch_state(theirs)
    for key, value in fr.state_dict(ours, variables).items():
        expected = theirs_sd[key].dtype
        assert np.dtype(value.dtype) == expected or key == "num_batches_tracked", key
    assert np.dtype(variables["buffers"]["num_batches_tracked"].dtype).kind == "i"


def test_group_norm_rejects_indivisible_channels_as_torch() -> None:
    with pytest.raises(ValueError) as theirs:
        torch.nn.GroupNorm(3, 4)
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        fr.init_variables(frnn.GroupNorm(3, 4), jax.random.key(0))


def test_layer_norm_rejects_empty_shape_with_torch_wording() -> None:
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.LayerNorm(())(torch.ones(3))
    with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
        fr.init_variables(frnn.LayerNorm(()), jax.random.key(0))


# --- forward passes -----------------------------------------------------------------------


@configs(ALL)
@frontends
def test_eval_matches_torch_and_leaves_buffers_alone(config: Config, frontend: str) -> None:
    ours, theirs = make_pair(config)
    loaded = Loaded(frontend, ours, theirs)
    before = {k: np.asarray(v) for k, v in loaded.named_buffers().items()}
    x = inputs(config[2])
    out = loaded(x)
    assert_close(out, torch_call(theirs, x, train=False))
    assert out.shape == x.shape and out.dtype == jnp.float32
    for key, value in loaded.named_buffers().items():
        np.testing.assert_array_equal(np.asarray(value), before[key], err_msg=key)
    assert_close(ours.apply(loaded.variables, x), out)  # immutable inference call


@configs(ALL)
@frontends
def test_train_matches_torch_and_updates_buffers_as_torch(config: Config, frontend: str) -> None:
    ours, theirs = make_pair(config)
    loaded = Loaded(frontend, ours, theirs)
    for step in range(3):
        x = inputs(config[2], seed=step + 1)
        out = loaded(x, train=True)
        assert_close(out, torch_call(theirs, x, train=True))
        assert_named_buffers_match(loaded.named_buffers(), theirs)  # after 1, 2 and 3 passes
    assert_state_dict_keys_match(loaded.state_dict(), theirs)


def test_instance_norm_never_counts_batches_and_none_momentum_freezes_stats() -> None:
    """PyTorch quirks, pinned: InstanceNorm never increments num_batches_tracked, and its
    momentum=None is a factor of 0, not BatchNorm's cumulative average."""
    config: Config = (
        "InstanceNorm1d",
        {"num_features": 3, "track_running_stats": True, "momentum": None},
        (2, 3, 4),
    )
    ours, theirs = make_pair(config)
    variables = load(ours, theirs)
    x = inputs(config[2])
    _, new = fr.apply(ours, variables, x, train=True)
    torch_call(theirs, x, train=True)
    assert_buffers_match(ours, new, theirs)
    jax.tree.map(np.testing.assert_array_equal, new["buffers"], variables["buffers"])


def test_batch_norm_cumulative_average_under_jit() -> None:
    config: Config = ("BatchNorm2d", {"num_features": 3, "momentum": None}, (2, 3, 2, 2))
    ours, theirs = make_pair(config)
    variables = load(ours, theirs)
    step = jax.jit(lambda v, x: fr.apply(ours, v, x, train=True))
    for i in range(3):
        x = inputs(config[2], seed=i)
        out, variables = step(variables, x)
        assert_close(out, torch_call(theirs, x, train=True))
        assert_buffers_match(ours, variables, theirs)


def test_instance_norm_channel_mismatch_warns_as_torch() -> None:
    ours, theirs = make_pair(("InstanceNorm1d", {"num_features": 3}, (2, 4, 5)))
    x = inputs((2, 4, 5))
    with pytest.warns(UserWarning) as torch_warnings:
        expected = torch_call(theirs, x, train=True)
    with pytest.warns(UserWarning, match=re.escape(str(torch_warnings[0].message))):
        out, _ = fr.apply(ours, {}, x, train=True)
    assert_close(out, expected)


@pytest.mark.parametrize(
    ("name", "kwargs", "shape", "train"),
    [("BatchNorm2d", {"num_features": 3}, (2, 3, 3, 3), False),
     ("BatchNorm2d", {"num_features": 3}, (2, 3, 3, 3), True),
     ("InstanceNorm1d", {"num_features": 3, "affine": True}, (2, 3, 5), True),
     ("LayerNorm", {"normalized_shape": 4}, (2, 3, 4), False),
     ("GroupNorm", {"num_groups": 2, "num_channels": 4}, (2, 4, 3), False)],
)  # fmt: skip
def test_bfloat16_input_gives_bfloat16_output_as_torch(
    name: str, kwargs: dict[str, Any], shape: tuple[int, ...], train: bool
) -> None:
    ours, theirs = make_pair((name, kwargs, shape))
    variables = load(ours, theirs)
    x = inputs(shape)
    x_bf16 = torch.tensor(x).bfloat16()
    out, _ = fr.apply(ours, variables, jnp.asarray(to_numpy(x_bf16)), train=train)
    theirs.train(train)
    with torch.no_grad():
        expected = theirs(x_bf16)
    assert out.dtype == jnp.bfloat16
    assert_close(np.asarray(out, np.float32), expected.float(), rtol=1e-2, atol=1e-2)


# --- gradients ----------------------------------------------------------------------------


def _check_gradients(loaded: Loaded, theirs: torch.nn.Module, x: np.ndarray, train: bool) -> None:
    theirs.train(train)
    t_x = torch.tensor(x, requires_grad=True)
    expected = theirs(t_x)
    cot = np.random.default_rng(0).standard_normal(tuple(expected.shape)).astype(np.float32)
    (expected * torch.tensor(cot)).sum().backward()
    out, (x_grad,), grads = loaded.value_and_grads(lambda y: jnp.sum(y * cot), x, train=train)
    assert_close(out, expected.detach())
    assert_close(x_grad, t_x.grad, rtol=1e-4, atol=1e-5)
    for name, p in theirs.named_parameters():
        assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5)


@configs(ALL)
@frontends
def test_eval_gradients_match_torch_autograd(config: Config, frontend: str) -> None:
    ours, theirs = make_pair(config)
    _check_gradients(Loaded(frontend, ours, theirs), theirs, inputs(config[2]), train=False)


@configs(STATEFUL)  # LayerNorm and GroupNorm compute the same in both modes
@frontends
def test_train_gradients_match_torch_autograd(config: Config, frontend: str) -> None:
    ours, theirs = make_pair(config)
    _check_gradients(Loaded(frontend, ours, theirs), theirs, inputs(config[2]), train=True)


# --- mutability ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config", [BATCH_NORM[0], INSTANCE_NORM[1]], ids=[_id(BATCH_NORM[0]), _id(INSTANCE_NORM[1])]
)
def test_train_call_with_immutable_buffers_raises_the_core_error(config: Config) -> None:
    ours, theirs = make_pair(config)
    variables = load(ours, theirs)
    x = inputs(config[2])
    with pytest.raises(RuntimeError, match=r"cannot update buffer '\w+' .* immutable"):
        ours.apply(variables, x, train=True)
    ours.apply(variables, x)  # eval needs no mutable buffers


def test_nested_layers_update_their_own_buffers() -> None:
    class Net(fr.Module):
        def setup(self) -> None:
            self.bn = frnn.BatchNorm1d(3)
            self.norms = [frnn.LayerNorm(5), frnn.InstanceNorm1d(3, track_running_stats=True)]

        def __call__(self, x: Any, *, train: bool = False) -> Any:
            return self.norms[1](self.norms[0](self.bn(x, train=train)), train=train)

    class TorchNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(3)
            self.norms = torch.nn.ModuleList(
                [torch.nn.LayerNorm(5), torch.nn.InstanceNorm1d(3, track_running_stats=True)]
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norms[1](self.norms[0](self.bn(x)))

    torch.manual_seed(0)
    ours, theirs = Net(), TorchNet()
    variables = load_from_torch(ours, theirs)
    assert_state_dict_matches(ours, variables, theirs)
    for step in range(2):
        x = inputs((2, 3, 5), seed=step)
        out, variables = fr.apply(ours, variables, x, train=True)
        assert_close(out, torch_call(theirs, x, train=True))
    assert_buffers_match(ours, variables, theirs)
    assert_close(ours.apply(variables, x), torch_call(theirs, x, train=False))


# --- bad inputs: PyTorch's exception type and wording ---------------------------------------

BAD_INPUTS: list[tuple[str, dict[str, Any], tuple[int, ...], bool]] = [
    ("BatchNorm2d", {"num_features": 3}, (2, 3, 4), False),
    ("BatchNorm1d", {"num_features": 3}, (2, 3, 2, 2), True),
    ("BatchNorm3d", {"num_features": 2}, (2, 2, 3, 3), False),
    ("BatchNorm2d", {"num_features": 3}, (2, 4, 2, 2), False),
    ("BatchNorm2d", {"num_features": 3}, (2, 4, 2, 2), True),
    ("BatchNorm2d", {"num_features": 3, "track_running_stats": False}, (2, 4, 2, 2), True),
    ("BatchNorm1d", {"num_features": 3}, (1, 3), True),
    ("BatchNorm1d", {"num_features": 3, "track_running_stats": False}, (1, 3, 1), False),
    ("InstanceNorm1d", {"num_features": 3}, (2, 3, 2, 2), True),
    ("InstanceNorm2d", {"num_features": 3}, (3, 3), False),
    ("InstanceNorm1d", {"num_features": 3, "affine": True}, (2, 4, 5), False),
    ("InstanceNorm1d", {"num_features": 3, "track_running_stats": True}, (2, 4, 5), True),
    ("InstanceNorm1d", {"num_features": 3}, (2, 3, 1), True),
    ("InstanceNorm2d", {"num_features": 3}, (3, 1, 1), False),
    ("LayerNorm", {"normalized_shape": (3, 4)}, (2, 4, 3), False),
    ("LayerNorm", {"normalized_shape": (3, 4)}, (4,), False),
    ("GroupNorm", {"num_groups": 2, "num_channels": 4}, (2, 5, 3), False),
    ("GroupNorm", {"num_groups": 2, "num_channels": 4}, (2, 6, 3), False),
    ("GroupNorm", {"num_groups": 2, "num_channels": 4}, (4,), False),
    ("GroupNorm", {"num_groups": 1, "num_channels": 1}, (1, 1), True),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "shape", "train"),
    BAD_INPUTS,
    ids=[f"{_id((n, k, s))}-{'train' if t else 'eval'}" for n, k, s, t in BAD_INPUTS],
)
def test_bad_input_raises_torch_error(
    name: str, kwargs: dict[str, Any], shape: tuple[int, ...], train: bool
) -> None:
    ours, theirs = make_pair((name, kwargs, shape))
    variables = load(ours, theirs)
    x = inputs(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as expected:
            torch_call(theirs, x, train=train)
        with pytest.raises(type(expected.value)) as info:
            fr.apply(ours, variables, x, train=train)
    wording = re.sub(r"torch\.Size\((\[.*?\])\)", r"\1", str(expected.value))
    assert str(info.value).startswith(wording)


def test_sequential_passes_train_to_the_norm_layers() -> None:
    ours = frnn.Sequential(frnn.BatchNorm1d(3), frnn.LayerNorm(3), frnn.GroupNorm(1, 3))
    theirs = torch.nn.Sequential(
        torch.nn.BatchNorm1d(3), torch.nn.LayerNorm(3), torch.nn.GroupNorm(1, 3)
    )
    variables = load_from_torch(ours, theirs)
    x = inputs((4, 3))
    out, variables = fr.apply(ours, variables, x, train=True)
    assert_close(out, torch_call(theirs, x, train=True))
    assert_buffers_match(ours, variables, theirs)
    assert_close(ours.apply(variables, x), torch_call(theirs, x, train=False))
