"""Linear, Conv*, ConvTranspose*, pooling, activations, Embedding, Dropout against PyTorch.

Every torch layer is built with random weights (torch.manual_seed), its state_dict is loaded
strictly with no renaming, and both layers see the same inputs: outputs, state_dict
keys/order/shapes/dtypes and gradients w.r.t. inputs and parameters must agree.
"""

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
from flax_registry import nn as frnn
from flax_registry._linen.tree import build as build_tree
from tests.frontends import Loaded, frontends
from tests.parity import (
    assert_close,
    assert_state_dict_keys_match,
    assert_state_dict_matches,
    input_and_param_grads,
    to_numpy,
)

Config = tuple[str, dict[str, Any], tuple[int, ...]]


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def build(name: str, kwargs: dict[str, Any], seed: int = 0) -> tuple[Any, torch.nn.Module]:
    torch.manual_seed(seed)
    return getattr(frnn, name)(**kwargs), getattr(torch.nn, name)(**kwargs)


def load(ours: Any, theirs: torch.nn.Module) -> dict[str, Any]:
    """`tests.parity.load_from_torch` without the random init: the torch state_dict is loaded
    strictly into abstract variables (shapes only), which skips compiling the initializers."""
    variables, report = fr.load_state_dict(ours, fr.abstract_variables(ours), theirs.state_dict())
    assert not report.missing_keys and not report.unexpected_keys
    return {"params": {}, **variables}


def check_parity(
    ours: Any,
    theirs: torch.nn.Module,
    *inputs: np.ndarray,
    train: bool = False,
    frontend: str = "linen",
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Same state_dict; same outputs and same gradients of sum(output * cotangent) w.r.t.
    inputs and parameters as torch autograd, on `frontend` (linen, or the layer lifted into
    NNX).

    The forward pass and the gradients are one jit compilation: half the CPU time of
    op-by-op dispatch, and it checks that every layer traces and differentiates under jit
    (a concrete-only code path would fail).
    """
    loaded = Loaded(frontend, ours, theirs)
    assert_state_dict_keys_match(loaded.state_dict(), theirs)
    theirs.train(train)
    t_inputs = [torch.tensor(x, requires_grad=True) for x in inputs]
    expected = theirs(*t_inputs, **call_kwargs)
    cot = np.random.default_rng(0).standard_normal(tuple(expected.shape)).astype(np.float32)
    (expected * torch.tensor(cot)).sum().backward()
    out, input_grads, ours_grads = loaded.value_and_grads(
        lambda y: jnp.sum(y * cot), *inputs, train=train, **call_kwargs
    )
    assert out.shape == tuple(expected.shape)
    assert out.dtype == jnp.float32
    assert_close(out, expected)
    for x, grad in zip(t_inputs, input_grads):
        assert_close(grad, x.grad, rtol=1e-4, atol=1e-5)
    for name, param in theirs.named_parameters():
        assert_close(ours_grads[name], param.grad, rtol=1e-4, atol=1e-5)
    return loaded.variables


def message_pattern(message: str) -> str:
    """A regex for torch's message; a set literal in it (printed in hash order) matches any order."""
    parts = re.split(r"\{[^{}]*\}", message)
    return r"\{.*\}".join(re.escape(part) for part in parts)


def torch_message(fn: Any) -> str:
    """The message torch raises for the same mistake (our messages start with it)."""
    with pytest.raises(Exception) as info:
        fn()
    return str(info.value)


# --- Linear, Identity, Flatten, Unflatten ----------------------------------------------------

LINEAR: list[Config] = [
    ("Linear", {"in_features": 4, "out_features": 3}, (2, 4)),
    ("Linear", {"in_features": 4, "out_features": 3, "bias": False}, (2, 5, 4)),
    ("Linear", {"in_features": 4, "out_features": 2}, (4,)),
    ("Identity", {}, (2, 3)),
    ("Flatten", {}, (2, 3, 2, 2)),
    ("Flatten", {"start_dim": 0, "end_dim": 1}, (2, 3, 2)),
    ("Unflatten", {"dim": 1, "unflattened_size": (2, 3)}, (2, 6)),
    ("Unflatten", {"dim": -1, "unflattened_size": (2, -1)}, (2, 3, 4)),
]


@pytest.mark.parametrize(("name", "kwargs", "shape"), LINEAR)
@frontends
def test_linear_and_reshapes_match_torch(
    name: str, kwargs: dict[str, Any], shape: tuple, frontend: str
) -> None:
    ours, theirs = build(name, kwargs)
    check_parity(ours, theirs, randn(*shape), frontend=frontend)


def test_linear_bias_argument_and_tensor_share_a_name() -> None:
    ours, theirs = build("Linear", {"in_features": 3, "out_features": 2})
    variables = load(ours, theirs)
    bound = ours.bind(variables)
    assert bound.bias is True
    assert_close(bound.get_parameter("bias"), theirs.bias)
    assert [n for n, _ in fr.named_parameters(ours, variables)] == ["weight", "bias"]


def test_linear_wrong_width_uses_torch_message() -> None:
    ours, theirs = build("Linear", {"in_features": 5, "out_features": 3})
    variables = load(ours, theirs)
    expected = torch_message(lambda: theirs(torch.zeros(2, 4)))
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        ours.apply(variables, jnp.zeros((2, 4)))


def test_unflatten_bad_sizes_uses_torch_message() -> None:
    expected = torch_message(lambda: torch.nn.Unflatten(1, (2, 3))(torch.zeros(2, 5)))
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        frnn.Unflatten(1, (2, 3)).apply({}, jnp.zeros((2, 5)))


# --- Conv ------------------------------------------------------------------------------------

CONV: list[Config] = [
    ("Conv2d", {"in_channels": 3, "out_channels": 4, "kernel_size": 3}, (2, 3, 6, 5)),
    (
        "Conv2d",
        {
            "in_channels": 3,
            "out_channels": 4,
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
            "bias": False,
        },
        (2, 3, 7, 6),
    ),
    (
        "Conv2d",
        {
            "in_channels": 2,
            "out_channels": 4,
            "kernel_size": (2, 3),
            "stride": (2, 1),
            "padding": (1, 2),
            "dilation": 2,
        },
        (1, 2, 7, 6),
    ),
    (
        "Conv2d",
        {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 2, "padding": 1},
        (2, 4, 5, 5),
    ),
    (
        "Conv2d",
        {"in_channels": 4, "out_channels": 8, "kernel_size": 3, "groups": 4, "stride": 2},
        (2, 4, 6, 6),
    ),
    (
        "Conv2d",
        {"in_channels": 3, "out_channels": 2, "kernel_size": 4, "padding": "same"},
        (1, 3, 5, 6),
    ),
    (
        "Conv2d",
        {
            "in_channels": 3,
            "out_channels": 2,
            "kernel_size": (2, 3),
            "padding": "same",
            "dilation": (1, 2),
        },
        (1, 3, 5, 6),
    ),
    (
        "Conv2d",
        {"in_channels": 3, "out_channels": 2, "kernel_size": 3, "padding": "valid"},
        (1, 3, 5, 4),
    ),
    (
        "Conv2d",
        {
            "in_channels": 2,
            "out_channels": 3,
            "kernel_size": 3,
            "padding": 1,
            "padding_mode": "reflect",
        },
        (2, 2, 4, 5),
    ),
    (
        "Conv2d",
        {
            "in_channels": 2,
            "out_channels": 3,
            "kernel_size": 3,
            "padding": (1, 2),
            "padding_mode": "replicate",
            "stride": 2,
        },
        (2, 2, 5, 5),
    ),
    (
        "Conv2d",
        {
            "in_channels": 2,
            "out_channels": 2,
            "kernel_size": 3,
            "padding": 2,
            "padding_mode": "circular",
            "groups": 2,
        },
        (2, 2, 4, 5),
    ),
    (
        "Conv2d",
        {
            "in_channels": 2,
            "out_channels": 3,
            "kernel_size": 4,
            "padding": "same",
            "padding_mode": "reflect",
        },
        (1, 2, 5, 6),
    ),
    (
        "Conv2d",
        {"in_channels": 3, "out_channels": 2, "kernel_size": 3, "padding": 1},
        (3, 4, 4),
    ),  # unbatched
    (
        "Conv1d",
        {
            "in_channels": 4,
            "out_channels": 2,
            "kernel_size": 4,
            "padding": "same",
            "groups": 2,
            "padding_mode": "circular",
        },
        (2, 4, 7),
    ),
    (
        "Conv1d",
        {
            "in_channels": 2,
            "out_channels": 3,
            "kernel_size": 3,
            "stride": 3,
            "padding": 1,
            "dilation": 2,
        },
        (2, 2, 11),
    ),
    (
        "Conv1d",
        {"in_channels": 3, "out_channels": 3, "kernel_size": 2, "groups": 3, "bias": False},
        (3, 6),
    ),
    (
        "Conv3d",
        {
            "in_channels": 2,
            "out_channels": 4,
            "kernel_size": (2, 3, 1),
            "stride": (1, 2, 1),
            "padding": 1,
            "groups": 2,
        },
        (1, 2, 3, 5, 4),
    ),
    (
        "Conv3d",
        {
            "in_channels": 1,
            "out_channels": 2,
            "kernel_size": 2,
            "padding": "same",
            "padding_mode": "replicate",
        },
        (1, 1, 3, 4, 3),
    ),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(("name", "kwargs", "shape"), CONV)
@frontends
def test_conv_matches_torch(name: str, kwargs: dict[str, Any], shape: tuple, frontend: str) -> None:
    ours, theirs = build(name, kwargs)
    check_parity(ours, theirs, randn(*shape), frontend=frontend)


CONV_TRANSPOSE: list[Config] = [
    (
        "ConvTranspose2d",
        {
            "in_channels": 3,
            "out_channels": 2,
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
            "output_padding": 1,
        },
        (2, 3, 4, 3),
    ),
    (
        "ConvTranspose2d",
        {
            "in_channels": 4,
            "out_channels": 6,
            "kernel_size": 3,
            "stride": 2,
            "dilation": 2,
            "output_padding": 1,
            "groups": 2,
        },
        (1, 4, 3, 4),
    ),
    (
        "ConvTranspose2d",
        {
            "in_channels": 2,
            "out_channels": 3,
            "kernel_size": (2, 3),
            "stride": (2, 1),
            "padding": (0, 1),
            "bias": False,
        },
        (2, 2, 3, 4),
    ),
    (
        "ConvTranspose2d",
        {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "groups": 4, "stride": 3},
        (1, 4, 3, 3),
    ),
    (
        "ConvTranspose2d",
        {"in_channels": 2, "out_channels": 3, "kernel_size": 3, "padding": 1},
        (2, 3, 4),
    ),  # unbatched
    (
        "ConvTranspose1d",
        {
            "in_channels": 2,
            "out_channels": 4,
            "kernel_size": 3,
            "stride": 3,
            "padding": 2,
            "output_padding": 1,
            "dilation": 2,
        },
        (2, 2, 5),
    ),
    (
        "ConvTranspose1d",
        {"in_channels": 2, "out_channels": 2, "kernel_size": 2, "stride": 3, "padding": 2},
        (1, 2, 6),
    ),
    (
        "ConvTranspose3d",
        {"in_channels": 2, "out_channels": 4, "kernel_size": 2, "stride": 2, "groups": 2},
        (1, 2, 2, 3, 2),
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "shape"), CONV_TRANSPOSE)
@frontends
def test_conv_transpose_matches_torch(
    name: str, kwargs: dict[str, Any], shape: tuple, frontend: str
) -> None:
    ours, theirs = build(name, kwargs)
    check_parity(ours, theirs, randn(*shape), frontend=frontend)


@pytest.mark.parametrize("output_size", [(9, 9), (9, 10), [1, 3, 10, 10]])
@frontends
def test_conv_transpose_output_size(output_size: Any, frontend: str) -> None:
    ours, theirs = build(
        "ConvTranspose2d", {"in_channels": 2, "out_channels": 3, "kernel_size": 3, "stride": 2}
    )
    check_parity(ours, theirs, randn(1, 2, 4, 4), output_size=output_size, frontend=frontend)


def test_conv_transpose_output_size_out_of_range_uses_torch_message() -> None:
    ours, theirs = build(
        "ConvTranspose2d", {"in_channels": 2, "out_channels": 2, "kernel_size": 3, "stride": 2}
    )
    variables = load(ours, theirs)
    x = randn(1, 2, 4, 4)
    expected = torch_message(lambda: theirs(torch.tensor(x), output_size=(20, 20)))
    expected = expected.split(" (for an input")[0]
    with pytest.raises(ValueError, match=re.escape(expected)):
        ours.apply(variables, x, output_size=(20, 20))


CONV_ERRORS: list[tuple[str, dict[str, Any]]] = [
    ("Conv2d", {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "groups": 2}),
    ("Conv2d", {"in_channels": 4, "out_channels": 3, "kernel_size": 3, "groups": 2}),
    ("Conv2d", {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "groups": 0}),
    ("Conv2d", {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding_mode": "foo"}),
    ("Conv2d", {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": "foo"}),
    (
        "Conv2d",
        {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "stride": 2, "padding": "same"},
    ),
    (
        "ConvTranspose2d",
        {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding_mode": "reflect"},
    ),
]


@pytest.mark.parametrize(("name", "kwargs"), CONV_ERRORS)
def test_conv_constructor_errors_use_torch_messages(name: str, kwargs: dict[str, Any]) -> None:
    expected = torch_message(lambda: getattr(torch.nn, name)(**kwargs))
    with pytest.raises(ValueError, match=message_pattern(expected)):
        getattr(frnn, name)(**kwargs)


def test_conv_transpose_output_padding_too_large_uses_torch_message() -> None:
    kwargs = {
        "in_channels": 2,
        "out_channels": 2,
        "kernel_size": 3,
        "stride": 2,
        "output_padding": 2,
    }
    expected = torch_message(lambda: torch.nn.ConvTranspose2d(**kwargs)(torch.zeros(1, 2, 4, 4)))
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        frnn.ConvTranspose2d(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({"in_channels": 4, "out_channels": 4, "kernel_size": 3}, (1, 3, 5, 5)),
        ({"in_channels": 4, "out_channels": 4, "kernel_size": 3}, (5, 5)),
        ({"in_channels": 4, "out_channels": 4, "kernel_size": 3}, (1, 4, 2, 2)),
        (
            {
                "in_channels": 1,
                "out_channels": 1,
                "kernel_size": 3,
                "padding": 3,
                "padding_mode": "reflect",
            },
            (1, 1, 3, 3),
        ),
    ],
)
def test_conv_forward_errors_use_torch_messages(kwargs: dict[str, Any], shape: tuple) -> None:
    ours, theirs = build("Conv2d", kwargs)
    variables = load(ours, theirs)
    expected = torch_message(lambda: theirs(torch.zeros(shape)))
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        ours.apply(variables, jnp.zeros(shape))


# --- initial distributions --------------------------------------------------------------------

INIT: list[tuple[str, dict[str, Any]]] = [
    ("Linear", {"in_features": 48, "out_features": 64}),
    ("Conv1d", {"in_channels": 8, "out_channels": 64, "kernel_size": 5, "groups": 4}),
    ("ConvTranspose2d", {"in_channels": 16, "out_channels": 8, "kernel_size": 3, "groups": 2}),
]


@pytest.mark.parametrize(("name", "kwargs"), INIT)
def test_default_init_has_torch_distribution(name: str, kwargs: dict[str, Any]) -> None:
    """kaiming_uniform(a=sqrt(5)) weight and U(+-1/sqrt(fan_in)) bias, fans as torch's."""
    ours, theirs = build(name, kwargs)
    variables = jax.jit(fr.init_variables, static_argnums=0)(ours, jax.random.key(1))
    mine = fr.state_dict(ours, variables)
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(theirs.weight)
    bound = 1 / math.sqrt(fan_in)
    for key in ("weight", "bias"):
        ours_v, theirs_v = np.asarray(mine[key]), to_numpy(theirs.state_dict()[key])
        assert ours_v.shape == theirs_v.shape
        assert np.abs(ours_v).max() <= bound
        assert np.abs(theirs_v).max() <= bound
        assert np.abs(ours_v).max() > 0.8 * bound  # fills the range, as torch's does
        np.testing.assert_allclose(ours_v.std(), bound / math.sqrt(3), rtol=0.25)


def test_embedding_init_is_standard_normal_with_zero_padding_row() -> None:
    ours = frnn.Embedding(400, 8, padding_idx=-2)
    variables = jax.jit(fr.init_variables, static_argnums=0)(ours, jax.random.key(0))
    weight = np.asarray(fr.state_dict(ours, variables)["weight"])
    assert np.all(weight[398] == 0)
    rest = np.delete(weight, 398, axis=0)
    assert abs(rest.mean()) < 0.05
    np.testing.assert_allclose(rest.std(), 1.0, rtol=0.05)


def test_init_module_is_torch_nn_init() -> None:
    shape = (8, 4, 3)
    assert frnn.init.calculate_fan_in_and_fan_out(shape) == (12, 24)
    for nonlinearity, param in [
        ("relu", None),
        ("leaky_relu", 0.2),
        ("tanh", None),
        ("selu", None),
    ]:
        assert frnn.init.calculate_gain(nonlinearity, param) == pytest.approx(
            torch.nn.init.calculate_gain(nonlinearity, param)
        )
    expected = torch_message(lambda: torch.nn.init.kaiming_uniform_(torch.zeros(3)))
    with pytest.raises(ValueError, match=re.escape(expected)):
        frnn.init.kaiming_uniform()(jax.random.key(0), (3,))
    x = frnn.init.xavier_uniform(gain=2.0)(jax.random.key(0), (200, 100))
    assert float(jnp.abs(x).max()) <= 2.0 * math.sqrt(6 / 300)
    y = frnn.init.trunc_normal(mean=1.0, std=2.0, a=0.0, b=3.0)(jax.random.key(0), (1000,))
    assert float(y.min()) >= 0.0 and float(y.max()) <= 3.0


# --- pooling ----------------------------------------------------------------------------------

POOL: list[Config] = [
    ("MaxPool2d", {"kernel_size": 3, "stride": 2, "padding": 1}, (2, 2, 7, 8)),
    ("MaxPool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}, (1, 2, 8, 8)),
    (
        "MaxPool2d",
        {"kernel_size": (2, 3), "stride": 1, "padding": 1, "dilation": 2, "ceil_mode": True},
        (1, 2, 7, 6),
    ),
    ("MaxPool2d", {"kernel_size": 2}, (2, 5, 5)),  # unbatched, stride defaults to kernel
    ("MaxPool1d", {"kernel_size": 3, "stride": 2, "ceil_mode": True}, (2, 3, 8)),
    ("MaxPool1d", {"kernel_size": 2, "stride": 3, "padding": 1, "dilation": 3}, (2, 3, 10)),
    ("MaxPool3d", {"kernel_size": 2, "stride": (1, 2, 2), "padding": 1}, (1, 2, 3, 4, 5)),
    (
        "AvgPool2d",
        {
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
            "ceil_mode": True,
            "count_include_pad": False,
        },
        (2, 2, 8, 7),
    ),
    ("AvgPool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}, (2, 2, 8, 7)),
    ("AvgPool2d", {"kernel_size": (2, 3), "padding": 1, "divisor_override": 5}, (1, 2, 8, 7)),
    ("AvgPool2d", {"kernel_size": 2}, (3, 4, 5)),
    ("AvgPool1d", {"kernel_size": 4, "stride": 3, "padding": 2, "ceil_mode": True}, (2, 3, 10)),
    ("AvgPool1d", {"kernel_size": 3, "padding": 1, "count_include_pad": False}, (2, 3, 7)),
    (
        "AvgPool3d",
        {"kernel_size": 2, "stride": 2, "padding": 1, "ceil_mode": True},
        (1, 2, 3, 4, 5),
    ),
    ("AdaptiveAvgPool2d", {"output_size": (3, None)}, (2, 2, 7, 5)),
    ("AdaptiveAvgPool2d", {"output_size": 3}, (2, 2, 6, 6)),
    ("AdaptiveAvgPool2d", {"output_size": (4, 3)}, (2, 5, 7)),
    ("AdaptiveAvgPool2d", {"output_size": 1}, (2, 3, 5, 4)),
    ("AdaptiveAvgPool1d", {"output_size": 4}, (2, 3, 10)),
    ("AdaptiveAvgPool1d", {"output_size": 5}, (2, 3, 3)),
    ("AdaptiveMaxPool2d", {"output_size": (3, 4)}, (2, 2, 7, 5)),
    ("AdaptiveMaxPool1d", {"output_size": 3}, (2, 3, 8)),
]


@pytest.mark.parametrize(("name", "kwargs", "shape"), POOL)
@frontends
def test_pooling_matches_torch(
    name: str, kwargs: dict[str, Any], shape: tuple, frontend: str
) -> None:
    ours, theirs = build(name, kwargs)
    check_parity(ours, theirs, randn(*shape), frontend=frontend)


@frontends
def test_max_pool_gradient_goes_to_the_first_maximum_as_torch(frontend: str) -> None:
    x = np.zeros((1, 1, 4, 5), np.float32)  # every window is a tie
    for kwargs in ({"kernel_size": 2, "stride": 1}, {"kernel_size": 2, "stride": 1, "dilation": 2}):
        ours, theirs = build("MaxPool2d", kwargs)
        check_parity(ours, theirs, x, frontend=frontend)


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("MaxPool2d", {"kernel_size": 2, "padding": 2}, (1, 1, 5, 5)),
        ("AvgPool2d", {"kernel_size": 2, "padding": 2}, (1, 1, 5, 5)),
        ("MaxPool2d", {"kernel_size": 3}, (1, 1, 2, 2)),
    ],
)
def test_pooling_errors_use_torch_messages(name: str, kwargs: dict[str, Any], shape: tuple) -> None:
    expected = torch_message(lambda: getattr(torch.nn, name)(**kwargs)(torch.zeros(shape)))
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        ours = getattr(frnn, name)(**kwargs)
        ours.apply({}, jnp.zeros(shape))


def test_return_indices_is_refused_clearly() -> None:
    with pytest.raises(NotImplementedError, match="return_indices=True"):
        frnn.MaxPool2d(2, return_indices=True)


# --- activations ------------------------------------------------------------------------------

ACTIVATIONS: list[tuple[str, dict[str, Any]]] = [
    ("ReLU", {}),
    ("ReLU6", {}),
    ("LeakyReLU", {}),
    ("LeakyReLU", {"negative_slope": 0.2}),
    ("PReLU", {}),
    ("PReLU", {"num_parameters": 3, "init": 0.1}),
    ("ELU", {"alpha": 0.7}),
    ("CELU", {"alpha": 1.5}),
    ("SELU", {}),
    ("GELU", {}),
    ("GELU", {"approximate": "tanh"}),
    ("SiLU", {}),
    ("Mish", {}),
    ("Hardswish", {}),
    ("Hardsigmoid", {}),
    ("Hardtanh", {"min_val": -2.0, "max_val": 0.5}),
    ("Threshold", {"threshold": 0.3, "value": -1.0}),
    ("Tanh", {}),
    ("Sigmoid", {}),
    ("LogSigmoid", {}),
    ("Softplus", {}),
    ("Softplus", {"beta": 2.0, "threshold": 1.0}),
    ("Softsign", {}),
    ("Tanhshrink", {}),
    ("GLU", {}),
    ("Softmax", {"dim": 1}),
    ("Softmax", {"dim": -1}),
    ("LogSoftmax", {"dim": 2}),
    ("Softmin", {"dim": 0}),
]


@pytest.mark.parametrize(("name", "kwargs"), ACTIVATIONS)
@frontends
def test_activation_matches_torch(name: str, kwargs: dict[str, Any], frontend: str) -> None:
    ours, theirs = build(name, kwargs)
    check_parity(ours, theirs, randn(2, 3, 4, scale=4.0), frontend=frontend)


def test_activations_are_modules_in_named_modules() -> None:
    ours = frnn.Sequential(frnn.Linear(2, 2), frnn.ReLU(), frnn.GELU())
    names = [n for n, _ in fr.named_modules(ours, fr.abstract_variables(ours))]
    assert names == [
        n
        for n, _ in torch.nn.Sequential(
            torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.GELU()
        ).named_modules()
    ]


def test_gelu_is_exact_erf_by_default_unlike_flax() -> None:
    x = jnp.linspace(-3, 3, 7)
    ours = frnn.GELU().apply({}, x)
    assert_close(ours, torch.nn.functional.gelu(torch.tensor(np.asarray(x))))
    assert not np.allclose(np.asarray(ours), np.asarray(jax.nn.gelu(x)), rtol=0, atol=1e-6)
    expected = torch_message(lambda: torch.nn.GELU("foo")(torch.zeros(2)))
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        frnn.GELU("foo")


@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 3, 4), (2, 3, 4, 2)])
def test_softmax_without_dim_picks_torch_legacy_dim(shape: tuple) -> None:
    x = randn(*shape)
    with pytest.warns(UserWarning, match="Implicit dimension choice for softmax"):
        ours = frnn.Softmax().apply({}, x)
    with pytest.warns(UserWarning):
        expected = torch.nn.Softmax()(torch.tensor(x))
    assert_close(ours, expected)


def test_prelu_channel_mismatch_is_an_error() -> None:
    ours, theirs = build("PReLU", {"num_parameters": 3})
    variables = load(ours, theirs)
    with pytest.raises(RuntimeError, match="Mismatch of parameter numbers and input channel size"):
        ours.apply(variables, jnp.zeros((2, 4)))


# --- Embedding --------------------------------------------------------------------------------

EMBEDDING: list[dict[str, Any]] = [
    {"num_embeddings": 7, "embedding_dim": 3},
    {"num_embeddings": 7, "embedding_dim": 3, "padding_idx": 2},
    {"num_embeddings": 7, "embedding_dim": 3, "padding_idx": -1, "scale_grad_by_freq": True},
    {"num_embeddings": 7, "embedding_dim": 3, "max_norm": 1.0},
    {"num_embeddings": 7, "embedding_dim": 3, "max_norm": 0.5, "norm_type": 1.0, "padding_idx": 0},
]


@pytest.mark.parametrize("kwargs", EMBEDDING)
def test_embedding_matches_torch_including_weight_gradient(kwargs: dict[str, Any]) -> None:
    ours, theirs = build("Embedding", kwargs)
    indices = np.array([[0, 2, 6, 2], [6, 1, 2, 2]], np.int64)
    variables = load(ours, theirs)
    assert_state_dict_matches(ours, variables, theirs)
    out = ours.apply(variables, indices)
    cot = randn(*out.shape, seed=1)
    expected = theirs(torch.tensor(indices))
    assert_close(out, expected)
    (expected * torch.tensor(cot)).sum().backward()

    def loss(params: Any) -> Any:
        return jnp.sum(ours.apply({"params": params}, indices) * cot)

    grads = jax.grad(loss)(variables["params"])
    assert_close(grads["weight"], theirs.weight.grad)
    if ours.padding_idx is not None:
        assert np.all(np.asarray(grads["weight"])[ours.padding_idx] == 0)


def test_embedding_errors_use_torch_messages() -> None:
    ours, theirs = build("Embedding", {"num_embeddings": 5, "embedding_dim": 3})
    variables = load(ours, theirs)
    for bad, error in [
        (np.array([5]), IndexError),
        (np.array([-1]), IndexError),
        (np.array([1.0], np.float32), RuntimeError),
    ]:
        expected = torch_message(lambda bad=bad: theirs(torch.tensor(bad)))
        expected = expected.split(" instead")[0].split("but got")[0]
        with pytest.raises(error, match=re.escape(expected)):
            ours.apply(variables, bad)
    expected = torch_message(lambda: torch.nn.Embedding(5, 3, padding_idx=5))
    with pytest.raises(AssertionError, match=expected):
        frnn.Embedding(5, 3, padding_idx=5)


def test_embedding_from_pretrained() -> None:
    table = torch.randn(6, 4)
    theirs = torch.nn.Embedding.from_pretrained(table, padding_idx=1)
    ours = frnn.Embedding.from_pretrained(table, padding_idx=1)
    variables = fr.init_variables(ours, jax.random.key(0))
    assert_state_dict_matches(ours, variables, theirs)
    assert_close(fr.state_dict(ours, variables)["weight"], table)
    indices = np.array([1, 3, 5])
    assert_close(ours.apply(variables, indices), theirs(torch.tensor(indices)))
    ((_, slot, _),) = build_tree(ours.bind(variables)).parameters
    assert slot.trainable is False  # freeze=True: requires_grad=False
    unfrozen = frnn.Embedding.from_pretrained(table, freeze=False)
    ((_, slot, _),) = build_tree(
        unfrozen.bind(fr.init_variables(unfrozen, jax.random.key(0)))
    ).parameters
    assert slot.trainable is True


# --- Dropout ----------------------------------------------------------------------------------


@frontends
def test_dropout_eval_is_identity_and_p0_train_is_identity(frontend: str) -> None:
    x = randn(4, 5)
    for p in (0.0, 0.5):
        ours, theirs = build("Dropout", {"p": p})
        check_parity(ours, theirs, x)  # eval mode
    ours, theirs = build("Dropout", {"p": 0.0})
    check_parity(ours, theirs, x, train=True, frontend=frontend)
    input_and_param_grads(ours, load(ours, theirs), theirs, [x], train=True)  # eager


@pytest.mark.parametrize("p", [0.2, 0.7])
def test_dropout_train_scales_and_zeroes_like_torch(p: float) -> None:
    x = np.ones((200, 100), np.float32)
    ours = frnn.Dropout(p)
    out = np.asarray(fr.apply(ours, {}, x, train=True, rngs={"dropout": jax.random.key(3)})[0])
    expected = to_numpy(torch.nn.Dropout(p).train()(torch.tensor(x)))
    assert set(np.unique(out)) == set(np.unique(expected))  # {0, 1 / (1 - p)}
    zero_fraction = (out == 0).mean()
    assert abs(zero_fraction - p) < 4 * math.sqrt(p * (1 - p) / x.size)
    again = np.asarray(fr.apply(ours, {}, x, train=True, rngs={"dropout": jax.random.key(4)})[0])
    assert not np.array_equal(out, again)  # a new key draws a new mask


def test_dropout_p1_gives_zeros_and_channel_dropout_zeroes_channels() -> None:
    x = np.ones((2, 3, 4), np.float32)
    out = fr.apply(frnn.Dropout(1.0), {}, x, train=True)[0]
    assert_close(out, torch.nn.Dropout(1.0).train()(torch.tensor(x)))
    y = np.ones((20, 30, 2, 2), np.float32)
    out2 = np.asarray(
        fr.apply(frnn.Dropout2d(0.5), {}, y, train=True, rngs={"dropout": jax.random.key(0)})[0]
    )
    per_channel = out2.reshape(20, 30, -1)
    assert np.all(per_channel.min(-1) == per_channel.max(-1))  # whole channels
    assert set(np.unique(out2)) == {0.0, 2.0}
    out1 = np.asarray(
        fr.apply(
            frnn.Dropout1d(0.5), {}, y[0, :, :, 0], train=True, rngs={"dropout": jax.random.key(0)}
        )[0]
    )
    assert np.all(out1.min(-1) == out1.max(-1))


def test_dropout_errors() -> None:
    expected = torch_message(lambda: torch.nn.Dropout(1.5))
    with pytest.raises(ValueError, match=re.escape(expected)):
        frnn.Dropout(1.5)
    with pytest.raises(ValueError, match="no 'dropout' rng was given"):
        fr.apply(frnn.Dropout(0.5), {}, jnp.ones(3), train=True)
