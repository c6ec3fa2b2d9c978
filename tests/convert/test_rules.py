"""Every built-in rule: torch -> flax -> torch is bit-identical (f32, bf16, fp16, integer
buffers), and the converted flax layer computes what the torch layer computes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flax_registry.convert import Layout, MultiHeadAttentionRule, from_torch, to_torch
from flax_registry.convert._plan import Part
from flax_registry.convert._sharding import read_block
from flax_registry.convert._source import Source
from tests.convert._helpers import (
    assert_bit_identical,
    channels_first,
    channels_last,
    numpy_state,
    randomize,
)
from tests.parity import TOL


@dataclasses.dataclass
class Case:
    torch: Callable[[], torch.nn.Module]
    flax: nn.Module
    inputs: tuple[tuple[int, ...], ...]  # torch input shapes
    channels: bool = False  # inputs/outputs NC... in torch, N...C in flax
    call: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor] | None = None
    integer_input: int | None = None  # vocabulary size for integer inputs
    reshape_out: bool = False  # compare outputs flattened per batch row


def _mha(m: torch.nn.Module, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    q, k, v = xs if len(xs) == 3 else (xs[0],) * 3
    return m(q, k, v, need_weights=False)[0]


T = torch.nn
CASES = {
    "linear": Case(lambda: T.Linear(5, 3), nn.Dense(3), ((2, 5),)),
    "linear_nobias": Case(
        lambda: T.Linear(5, 3, bias=False), nn.Dense(3, use_bias=False), ((2, 5),)
    ),
    "dense_general_out": Case(
        lambda: T.Linear(6, 8), nn.DenseGeneral((2, 4)), ((2, 6),), reshape_out=True
    ),
    "conv1d": Case(
        lambda: T.Conv1d(4, 6, 3, padding=1), nn.Conv(6, (3,), padding=1), ((2, 4, 7),), True
    ),
    "conv2d_grouped_strided": Case(
        lambda: T.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=2),
        ((2, 4, 7, 7),),
        True,
    ),
    "conv2d_depthwise": Case(
        lambda: T.Conv2d(4, 4, 3, groups=4, bias=False),
        nn.Conv(4, (3, 3), padding="VALID", feature_group_count=4, use_bias=False),
        ((1, 4, 5, 5),),
        True,
    ),
    "conv3d": Case(
        lambda: T.Conv3d(2, 4, (2, 3, 3), padding=(0, 1, 1)),
        nn.Conv(4, (2, 3, 3), padding=((0, 0), (1, 1), (1, 1))),
        ((1, 2, 4, 5, 5),),
        True,
    ),
    "conv_transpose1d": Case(
        lambda: T.ConvTranspose1d(4, 3, 3, stride=2, padding=1, output_padding=1),
        nn.ConvTranspose(3, (3,), strides=(2,), padding=((1, 2),)),
        ((2, 4, 5),),
        True,
    ),
    "conv_transpose2d_transpose_kernel": Case(
        lambda: T.ConvTranspose2d(4, 3, 3, stride=2, padding=1),
        nn.ConvTranspose(
            3, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), transpose_kernel=True
        ),
        ((1, 4, 4, 4),),
        True,
    ),
    "conv_transpose3d": Case(
        lambda: T.ConvTranspose3d(2, 3, 2, stride=2),
        nn.ConvTranspose(3, (2, 2, 2), strides=(2, 2, 2), padding=((1, 1),) * 3),
        ((1, 2, 3, 3, 3),),
        True,
    ),
    "batchnorm1d": Case(
        lambda: T.BatchNorm1d(5).eval(),
        nn.BatchNorm(use_running_average=True, epsilon=1e-5),
        ((3, 5),),
    ),
    "batchnorm2d": Case(
        lambda: T.BatchNorm2d(4).eval(),
        nn.BatchNorm(use_running_average=True, epsilon=1e-5),
        ((2, 4, 3, 3),),
        True,
    ),
    "layernorm": Case(lambda: T.LayerNorm(6), nn.LayerNorm(epsilon=1e-5), ((2, 6),)),
    "groupnorm": Case(
        lambda: T.GroupNorm(2, 6), nn.GroupNorm(num_groups=2, epsilon=1e-5), ((2, 6, 3, 3),), True
    ),
    "rmsnorm": Case(lambda: T.RMSNorm(6, eps=1e-6), nn.RMSNorm(epsilon=1e-6), ((2, 6),)),
    "embedding": Case(lambda: T.Embedding(10, 4), nn.Embed(10, 4), ((2, 3),), integer_input=10),
    "mha": Case(
        lambda: T.MultiheadAttention(8, 2, batch_first=True),
        nn.MultiHeadDotProductAttention(num_heads=2),
        ((2, 3, 8),),
        call=_mha,
    ),
    "mha_kdim_vdim": Case(
        lambda: T.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True),
        nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=8),
        ((2, 3, 8), (2, 4, 6), (2, 4, 5)),
        call=_mha,
    ),
    "mha_nobias": Case(
        lambda: T.MultiheadAttention(8, 4, bias=False, batch_first=True),
        nn.MultiHeadDotProductAttention(num_heads=4, use_bias=False),
        ((2, 3, 8),),
        call=_mha,
    ),
}


def _torch_inputs(case: Case) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    if case.integer_input is not None:
        return tuple(torch.randint(0, case.integer_input, s, generator=g) for s in case.inputs)
    return tuple(torch.randn(s, generator=g) for s in case.inputs)


def _flax_inputs(case: Case, xs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    arrays = [x.numpy() for x in xs]
    return tuple(jnp.asarray(channels_last(a) if case.channels else a) for a in arrays)


def _abstract_inputs(case: Case) -> tuple[Any, ...]:
    return _flax_inputs(case, _torch_inputs(case))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_identical(name: str, dtype: torch.dtype) -> None:
    case = CASES[name]
    sd = randomize(case.torch()).to(dtype).state_dict()
    example = _abstract_inputs(case)
    variables, report = from_torch(case.flax, sd, example_inputs=example)
    assert report.ok
    # The model is float32: a half-precision checkpoint is cast, listed per key, and undone.
    casted = {k for k, _, _ in report.casts}
    floats = {k for k, v in sd.items() if v.is_floating_point()}
    assert casted == (floats if dtype != torch.float32 else set())
    back = to_torch(case.flax, variables, example_inputs=example, report=report)
    assert_bit_identical(back, sd)
    # Without the report: torch's order and values; num_batches_tracked synthesised as 0.
    kept, _ = from_torch(case.flax, sd, example_inputs=example, dtype="checkpoint")
    plain = to_torch(case.flax, kept, example_inputs=example)
    expected = numpy_state(sd)
    for key in expected:
        if key.endswith("num_batches_tracked"):
            expected[key] = np.zeros((), np.int64)
    assert_bit_identical(plain, expected)


@pytest.mark.parametrize("name", list(CASES))
def test_converted_layer_matches_torch(name: str) -> None:
    case = CASES[name]
    module = randomize(case.torch()).eval()
    xs = _torch_inputs(case)
    with torch.no_grad():
        expected = (case.call or (lambda m, a: m(*a)))(module, xs).numpy()
    inputs = _flax_inputs(case, xs)
    variables, _ = from_torch(case.flax, module.state_dict(), example_inputs=inputs)
    out = np.asarray(case.flax.apply(variables, *inputs))
    if case.channels:
        out = channels_first(out)
    if case.reshape_out:
        out = out.reshape(expected.shape)
    np.testing.assert_allclose(out, expected, **TOL)
    # The reverse direction loads strictly into torch.
    fresh = case.torch()
    fresh.load_state_dict(to_torch(case.flax, variables, example_inputs=inputs, as_torch=True))
    with torch.no_grad():
        again = (case.call or (lambda m, a: m(*a)))(fresh.eval(), xs).numpy()
    np.testing.assert_allclose(again, expected, **TOL)


def test_dense_general_with_two_input_axes_matches_linear() -> None:
    linear = randomize(torch.nn.Linear(8, 3))
    layer = nn.DenseGeneral(3, axis=(-2, -1))
    x = np.random.default_rng(0).standard_normal((2, 2, 4)).astype(np.float32)
    variables, _ = from_torch(layer, linear.state_dict(), example_inputs=(jnp.asarray(x),))
    assert variables["params"]["kernel"].shape == (2, 4, 3)
    with torch.no_grad():
        expected = linear(torch.from_numpy(x.reshape(2, 8))).numpy()
    np.testing.assert_allclose(np.asarray(layer.apply(variables, x)), expected, **TOL)


def test_mha_unfused_names_match_fused_rows() -> None:
    case = CASES["mha"]
    torch_mha = randomize(case.torch())
    example = _abstract_inputs(case)
    variables, _ = from_torch(case.flax, torch_mha.state_dict(), example_inputs=example)
    names = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
    rule = MultiHeadAttentionRule(fused=False, names=names)
    rules = {nn.MultiHeadDotProductAttention: rule}
    split = to_torch(case.flax, variables, example_inputs=example, rules=rules)
    assert list(split) == [f"{n}.{p}" for n in names.values() for p in ("weight", "bias")]
    fused = numpy_state(torch_mha.state_dict())
    e = 8
    for i, n in enumerate(("q_proj", "k_proj", "v_proj")):
        np.testing.assert_array_equal(
            split[f"{n}.weight"], fused["in_proj_weight"][i * e : (i + 1) * e]
        )
        np.testing.assert_array_equal(
            split[f"{n}.bias"], fused["in_proj_bias"][i * e : (i + 1) * e]
        )
    again, report = from_torch(case.flax, split, example_inputs=example, rules=rules)
    assert report.ok
    assert_bit_identical(to_torch(case.flax, again, example_inputs=example), fused)


# --- layouts and sharded block reads, for arbitrary permutations / merges / flips ------------


@st.composite
def layouts(draw: Any) -> tuple[Layout, tuple[int, ...]]:
    merge = tuple(draw(st.lists(st.integers(1, 2), min_size=1, max_size=3)))
    ndim = sum(merge)
    perm = tuple(draw(st.permutations(range(ndim))))
    flip = tuple(sorted(draw(st.sets(st.integers(0, ndim - 1)))))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    return Layout(perm=perm, merge=merge, flip=flip), shape


@settings(max_examples=60, deadline=None)
@given(layouts(), st.data())
def test_layout_inverts_and_blocks_map_back(layout_shape: Any, data: Any) -> None:
    layout, flax_shape = layout_shape
    torch_shape = layout.torch_shape(flax_shape)
    tensor = np.arange(int(np.prod(torch_shape)), dtype=np.float32).reshape(torch_shape)
    flax = layout.to_flax(tensor, flax_shape)
    assert flax.shape == flax_shape
    np.testing.assert_array_equal(layout.to_torch(np.ascontiguousarray(flax)), tensor)
    index = []
    for n in flax_shape:
        start = data.draw(st.integers(0, n - 1))
        index.append(slice(start, data.draw(st.integers(start + 1, n))))
    part = Part("params", ("w",), layout, np.empty(flax_shape))
    block = read_block(Source({"w": tensor}, "test"), "w", part, None, tuple(index), tensor.dtype)
    np.testing.assert_array_equal(block, flax[tuple(index)])


@pytest.mark.parametrize(
    ("shape", "perm", "flip", "dtype"),
    [
        ((70, 90), (1, 0), (), np.float32),
        ((300, 260), (1, 0), (), np.float32),  # several tiles each way, the last ones ragged
        ((260, 3, 130), (1, 2, 0), (1,), np.float32),
        ((33, 7, 3, 5), (2, 3, 1, 0), (0, 1), np.float32),  # a conv kernel, flipped
        ((40, 30, 9), (2, 0, 1), (), "bfloat16"),
    ],
)
def test_strip_copy_equals_plain_copy(shape: Any, perm: Any, flip: Any, dtype: Any) -> None:
    import ml_dtypes

    from flax_registry.convert._layout import copy_tiled
    from flax_registry.io import owned_empty

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    source = np.arange(np.prod(shape)).reshape(shape).astype(dt)
    x = np.flip(np.transpose(source, perm), flip) if flip else np.transpose(source, perm)
    for out_dtype in (dt, np.dtype(np.float32)):
        out = owned_empty(x.shape, out_dtype)
        assert out.ctypes.data % 64 == 0
        copy_tiled(out, x)
        np.testing.assert_array_equal(out, np.asarray(x, order="C").astype(out_dtype))
