"""Misuse raises what PyTorch raises for the same mistake, with its wording, and loses nothing."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_registry as fr

# Each case: (what torch's __init__ does, what our setup does, how our wording differs).
CASES: dict[str, tuple[Callable[[Any], None], Callable[[Any], None]]] = {
    "parameter name not a string": (
        lambda m: m.register_parameter(1, None),
        lambda m: m.register_parameter(1, None),
    ),
    "parameter name with a dot": (
        lambda m: m.register_parameter("a.b", None),
        lambda m: m.register_parameter("a.b", None),
    ),
    "empty parameter name": (
        lambda m: m.register_parameter("", None),
        lambda m: m.register_parameter("", None),
    ),
    "buffer name not a string": (
        lambda m: m.register_buffer(3.5, None),
        lambda m: m.register_buffer(3.5, None),
    ),
    "buffer name with a dot": (
        lambda m: m.register_buffer("a.b", None),
        lambda m: m.register_buffer("a.b", None),
    ),
    "empty buffer name": (
        lambda m: m.register_buffer("", None),
        lambda m: m.register_buffer("", None),
    ),
    "bare array as a parameter": (
        lambda m: m.register_parameter("x", torch.ones(2)),
        lambda m: m.register_parameter("x", jnp.ones(2)),
    ),
    "buffer name taken by a parameter": (
        lambda m: (m.register_parameter("w", None), m.register_buffer("w", None)),
        lambda m: (m.register_parameter("w", None), m.register_buffer("w", None)),
    ),
    "parameter name taken by a submodule": (
        lambda m: (setattr(m, "sub", torch.nn.Identity()), m.register_parameter("sub", None)),
        lambda m: (setattr(m, "sub", Empty()), m.register_parameter("sub", None)),
    ),
    "parameter name taken by a method": (
        lambda m: m.register_parameter("state_dict", None),
        lambda m: m.register_parameter("state_dict", None),
    ),
    "buffer name taken by a plain attribute": (
        lambda m: (setattr(m, "plain", 1), m.register_buffer("plain", None)),
        lambda m: (setattr(m, "plain", 1), m.register_buffer("plain", None)),
    ),
    "non-array buffer": (
        lambda m: m.register_buffer("b", [1, 2]),
        lambda m: m.register_buffer("b", [1, 2]),
    ),
    "array assigned to a parameter's name": (
        lambda m: (
            m.register_parameter("w", torch.nn.Parameter(torch.ones(1))),
            setattr(m, "w", torch.ones(1)),
        ),
        lambda m: (
            m.register_parameter("w", fr.Parameter(jnp.ones(1))),
            setattr(m, "w", jnp.ones(1)),
        ),
    ),
    "module name with a dot": (
        lambda m: m.register_module("a.b", torch.nn.Identity()),
        lambda m: m.register_module("a.b", Empty()),
    ),
    "empty module name": (
        lambda m: m.register_module("", torch.nn.Identity()),
        lambda m: m.register_module("", Empty()),
    ),
    "not a module": (
        lambda m: m.register_module("x", 3),
        lambda m: m.register_module("x", 3),
    ),
    "module name taken by a buffer": (
        lambda m: (m.register_buffer("x", None), m.register_module("x", torch.nn.Identity())),
        lambda m: (m.register_buffer("x", None), m.register_module("x", Empty())),
    ),
}

# Where our message must differ, it differs by the names of the types involved only.
TRANSLATE = [
    ("torch.nn.Parameter", "flax_registry.Parameter"),
    ("torch.FloatTensor", "jax.Array"),
    ("torch Tensor or None required", "array, initializer or None required"),
]


class Empty(fr.Module):
    def __call__(self, x):
        return x


class Misuse(fr.Module):
    case: str

    def setup(self) -> None:
        CASES[self.case][1](self)


class TorchMisuse(torch.nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        CASES[case][0](self)


@pytest.mark.parametrize("case", list(CASES))
def test_misuse_raises_torch_type_and_message(case):
    with pytest.raises(Exception) as theirs:
        TorchMisuse(case)
    expected = str(theirs.value)
    for a, b in TRANSLATE:
        expected = expected.replace(a, b)
    with pytest.raises(type(theirs.value)) as ours:
        fr.init_variables(Misuse(case), jax.random.key(0))
    assert str(ours.value) == expected


def test_register_module_names_children_like_torch():
    class TorchBlock(torch.nn.Module):
        def __init__(self, dropout: float = 0.1) -> None:
            super().__init__()
            self.register_module("dropout", torch.nn.Linear(2, 2))
            self.register_module("0", torch.nn.Linear(2, 2))
            self.register_module("none", None)

    class Lin(fr.Module):
        def setup(self):
            self.register_parameter("weight", fr.Parameter(nn.initializers.ones, (2, 2)))
            self.register_parameter("bias", fr.Parameter(nn.initializers.zeros, (2,)))

    class Block(fr.Module):
        dropout: float = 0.1  # a constructor argument named like the child, as in torch

        def setup(self):
            self.register_module("dropout", Lin())
            self.register_module("0", Lin())
            self.register_module("none", None)

    v = fr.init_variables(Block(), jax.random.key(0))
    assert list(fr.state_dict(Block(), v)) == list(TorchBlock().state_dict())
    assert [n for n, _ in fr.named_modules(Block(), v)] == [
        n for n, _ in TorchBlock().named_modules()
    ]


def test_registration_outside_setup_is_refused():
    class Late(fr.Module):
        def __call__(self, x):
            self.register_buffer("b", jnp.zeros(2))
            return x

    with pytest.raises(RuntimeError, match=r"outside setup\(\).*Move the register_buffer\(\) call"):
        Late().init(jax.random.key(0), 1.0)


class Stats(fr.Module):
    def setup(self) -> None:
        self.register_parameter("weight", fr.Parameter(nn.initializers.ones, (2, 3)))
        self.register_buffer("running_mean", jnp.zeros(2))
        self.register_buffer("cache", lambda: jnp.arange(2.0), persistent=False)

    def __call__(self, x):
        y = x @ self.weight.T + self.cache
        self.update_buffer("running_mean", 0.9 * self.running_mean + 0.1 * y.mean(0))
        return y


class TorchStats(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 3))
        self.register_buffer("running_mean", torch.zeros(2))
        self.register_buffer("cache", torch.arange(2.0), persistent=False)

    def forward(self, x):
        y = x @ self.weight.T + self.cache
        self.running_mean.mul_(0.9).add_(0.1 * y.mean(0))
        return y


def snapshot(tree: Any) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(tree)]


def torch_error(sd: dict, strict: bool = True) -> str:
    with pytest.raises(RuntimeError) as info:
        TorchStats().load_state_dict(sd, strict=strict)
    # PyTorch prints shapes as torch.Size([2, 3]); we print them as (2, 3).
    return re.sub(
        r"torch\.Size\(\[([^\]]*)\]\)",
        lambda m: (
            "(" + m.group(1) + ("," if m.group(1).count(",") == 0 and m.group(1) else "") + ")"
        ),
        str(info.value),
    )


@pytest.mark.parametrize(
    "change",
    ["missing", "unexpected", "missing and unexpected", "shape", "shape non-strict"],
)
def test_load_errors_use_torch_wording_and_change_nothing(change):
    model = Stats()
    variables = fr.init_variables(model, jax.random.key(0))
    before = snapshot(variables)
    sd = TorchStats().state_dict()
    strict = change != "shape non-strict"
    if "missing" in change:
        del sd["weight"]
    if "unexpected" in change:
        sd["bias"] = torch.zeros(2)
    if "shape" in change:
        sd["running_mean"] = torch.zeros(3)
        sd["weight"] = torch.zeros(3, 2)
    expected = torch_error(sd, strict).replace("TorchStats", "Stats")
    with pytest.raises(RuntimeError) as ours:
        fr.load_state_dict(model, variables, sd, strict=strict)
    assert str(ours.value) == expected
    assert all(np.array_equal(a, b) for a, b in zip(before, snapshot(variables)))


def test_load_casts_to_model_dtype_and_returns_new_variables():
    model = Stats()
    variables = fr.init_variables(model, jax.random.key(0))
    sd = {
        "weight": np.full((2, 3), 2.5, np.float64),
        "running_mean": torch.ones(2, dtype=torch.bfloat16),
    }
    new, keys = fr.load_state_dict(model, variables, sd)
    assert new["params"]["weight"].dtype == jnp.float32
    assert new["buffers"]["running_mean"].dtype == jnp.float32
    np.testing.assert_array_equal(new["buffers"]["running_mean"], np.ones(2))
    assert variables["params"]["weight"][0, 0] == 1.0  # the input is untouched


def test_non_strict_load_refuses_to_leave_abstract_leaves():
    model = Stats()
    abstract = fr.abstract_variables(model)
    with pytest.raises(
        RuntimeError, match=r'(?s)Missing key\(s\) in state_dict: "weight".*uninitialised'
    ):
        fr.load_state_dict(model, abstract, {"running_mean": np.zeros(2)}, strict=False)


def test_state_dict_must_be_a_mapping():
    with pytest.raises(TypeError, match="Expected state_dict to be dict-like, got <class 'list'>."):
        fr.load_state_dict(Stats(), fr.init_variables(Stats(), jax.random.key(0)), [1, 2])


def test_buffer_updates_match_torch_and_need_mutable_buffers():
    model, tmodel = Stats(), TorchStats()
    variables = fr.init_variables(model, jax.random.key(0))
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    for _ in range(3):
        out, variables = fr.apply(model, variables, x)
        expected = tmodel(torch.tensor(x))
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        variables["buffers"]["running_mean"], tmodel.running_mean.detach().numpy(), rtol=1e-6
    )
    with pytest.raises(RuntimeError, match=r"Pass mutable=\['buffers'\] to apply"):
        model.apply(variables, x)


def test_missing_collection_error_names_the_fix():
    model = Stats()
    variables = fr.init_variables(model, jax.random.key(0))
    with pytest.raises(
        ValueError,
        match=r"Buffer 'running_mean' of Stats .* no 'buffers' collection was passed.*model.apply\(variables, x\)",
    ):
        model.apply({"params": variables["params"]}, jnp.ones((1, 3)))


def test_update_of_unknown_buffer_and_wrong_shape():
    class Bad(fr.Module):
        target: str
        shape: tuple

        def setup(self):
            self.register_buffer("count", jnp.zeros(2))

        def __call__(self):
            self.update_buffer(self.target, jnp.ones(self.shape))

    v = fr.init_variables(Bad("count", (2,)), jax.random.key(0))
    with pytest.raises(
        KeyError, match=r"'nope' is not a buffer of Bad: its buffers are \['count'\]"
    ):
        fr.apply(Bad("nope", (2,)), v)
    with pytest.raises(
        ValueError, match=r"new value has shape \(3,\), the buffer has shape \(2,\)"
    ):
        fr.apply(Bad("count", (3,)), v)


def test_non_persistent_buffer_is_recomputed_when_not_passed():
    model = Stats()
    variables = fr.init_variables(model, jax.random.key(0))
    assert "cache" not in fr.state_dict(model, variables)
    assert "cache" in dict(fr.named_buffers(model, variables))
    del variables["buffers"]["cache"]  # as after restoring a checkpoint, which never holds it
    x = jnp.ones((1, 3))
    out, updated = fr.apply(model, variables, x)
    np.testing.assert_array_equal(out, TorchStats()(torch.ones(1, 3)).detach().numpy())
    assert "cache" not in updated["buffers"]


def test_parameter_needs_array_or_initializer_with_shape():
    with pytest.raises(TypeError, match=r"Parameter\(.*\) wraps an initializer but no shape"):
        fr.Parameter(nn.initializers.zeros)
    with pytest.raises(
        TypeError, match="Parameter\\(\\) takes an array or an initializer, got 'list'"
    ):
        fr.Parameter([1.0])


def test_tie_after_use_is_refused():
    class Leaf(fr.Module):
        def setup(self):
            self.register_parameter("weight", fr.Parameter(jnp.ones(2)))

    class Late(fr.Module):
        def setup(self):
            self.a, self.b = Leaf(), Leaf()
            _ = self.b.weight
            self.tie_parameters("b.weight", "a.weight")

    with pytest.raises(RuntimeError, match="cannot tie 'b.weight' to 'a.weight'"):
        fr.init_variables(Late(), jax.random.key(0))
