"""Sequential, ModuleList, ModuleDict against PyTorch: names, order, loading, forward, train flag."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_registry as fr
from flax_registry import nn as frnn
from tests.nn.test_basic_layers import check_parity, load
from tests.parity import (
    assert_close,
    assert_state_dict_matches,
    input_and_param_grads,
)

tnn = torch.nn


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def module_names(ours: Any, variables: Any) -> list[str]:
    return [name for name, _ in fr.named_modules(ours, variables)]


def torch_names(theirs: torch.nn.Module) -> list[str]:
    return [name for name, _ in theirs.named_modules()]


def pair_sequential() -> tuple[Any, torch.nn.Module]:
    torch.manual_seed(0)
    theirs = tnn.Sequential(
        tnn.Conv2d(2, 3, 3, padding=1),
        tnn.ReLU(),
        tnn.MaxPool2d(2),
        tnn.Flatten(),
        tnn.Linear(12, 4),
        tnn.Dropout(0.5),
        tnn.Sequential(tnn.Linear(4, 3), tnn.GELU()),
    )
    ours = frnn.Sequential(
        frnn.Conv2d(2, 3, 3, padding=1),
        frnn.ReLU(),
        frnn.MaxPool2d(2),
        frnn.Flatten(),
        frnn.Linear(12, 4),
        frnn.Dropout(0.5),
        frnn.Sequential(frnn.Linear(4, 3), frnn.GELU()),
    )
    return ours, theirs


def test_sequential_names_order_forward_and_grads_match_torch() -> None:
    ours, theirs = pair_sequential()
    variables = load(ours, theirs)
    assert_state_dict_matches(ours, variables, theirs)
    assert list(fr.state_dict(ours, variables))[:2] == ["0.weight", "0.bias"]
    assert module_names(ours, variables) == torch_names(theirs)
    assert [n for n, _ in fr.named_parameters(ours, variables)] == [
        n for n, _ in theirs.named_parameters()
    ]
    check_parity(ours, theirs, randn(2, 2, 4, 4))  # eval: dropout is the identity


def test_train_flag_reaches_nested_children() -> None:
    """train=True is model.train(): it reaches Dropout inside a nested Sequential."""
    torch.manual_seed(0)
    theirs = tnn.Sequential(tnn.Linear(3, 3), tnn.Sequential(tnn.Dropout(0.0), tnn.Linear(3, 2)))
    ours = frnn.Sequential(frnn.Linear(3, 3), frnn.Sequential(frnn.Dropout(0.0), frnn.Linear(3, 2)))
    variables = load(ours, theirs)
    input_and_param_grads(ours, variables, theirs, [randn(4, 3)], train=True)

    drop_all = frnn.Sequential(frnn.Linear(3, 3), frnn.Sequential(frnn.Dropout(1.0)))
    v = fr.abstract_variables(drop_all)
    v = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), v)
    x = randn(4, 3)
    trained, _ = fr.apply(drop_all, v, x, train=True)
    assert np.all(np.asarray(trained) == 0)
    assert np.all(np.asarray(drop_all.apply(v, x)) != 0)  # eval by default


class TakesTrain(fr.Module):
    def __call__(self, x: Any, train: bool = False) -> Any:
        return x + (1.0 if train else 0.0)


class NoTrain(fr.Module):
    def __call__(self, x: Any) -> Any:
        return x * 2


def test_train_is_passed_only_to_children_that_accept_it() -> None:
    seq = frnn.Sequential(NoTrain(), TakesTrain(), frnn.Sequential(TakesTrain()), linen.Dense(2))
    variables = seq.init(jax.random.key(0), jnp.ones((1, 2)))
    x = jnp.ones((1, 2))
    dense = variables["params"]["layers_3"]
    expected_eval = (x * 2) @ dense["kernel"] + dense["bias"]
    expected_train = (x * 2 + 2) @ dense["kernel"] + dense["bias"]
    assert_close(seq.apply(variables, x), expected_eval)
    assert_close(seq.apply(variables, x, train=True), expected_train)
    assert frnn.mode.accepts_train(TakesTrain()) and not frnn.mode.accepts_train(NoTrain())


def test_sequential_under_jit_with_dropout_rng() -> None:
    ours, theirs = pair_sequential()
    variables = load(ours, theirs)
    x = randn(2, 2, 4, 4)

    @jax.jit
    def run(variables: Any, x: Any, key: Any) -> Any:
        return fr.apply(ours, variables, x, train=True, rngs={"dropout": key})[0]

    a, b = run(variables, x, jax.random.key(0)), run(variables, x, jax.random.key(1))
    assert a.shape == (2, 3) and not np.allclose(np.asarray(a), np.asarray(b))


def test_sequential_from_ordered_dict_uses_the_keys() -> None:
    torch.manual_seed(0)
    theirs = tnn.Sequential(
        OrderedDict(conv=tnn.Conv1d(2, 2, 3), act=tnn.Tanh(), fc=tnn.Linear(3, 1))
    )
    ours = frnn.Sequential(
        OrderedDict(conv=frnn.Conv1d(2, 2, 3), act=frnn.Tanh(), fc=frnn.Linear(3, 1))
    )
    variables = load(ours, theirs)
    assert_state_dict_matches(ours, variables, theirs)
    assert module_names(ours, variables) == torch_names(theirs)
    x = randn(2, 2, 5)
    assert_close(ours.apply(variables, x), theirs(torch.tensor(x)))
    assert ours.bind(variables)["fc"].out_features == 1


class Net(fr.Module):
    def setup(self) -> None:
        self.stem = frnn.Linear(3, 4)
        self.blocks = frnn.ModuleList(
            [frnn.Sequential(frnn.Linear(4, 4), frnn.SiLU()) for _ in range(3)]
        )
        self.heads = frnn.ModuleDict(
            {"b": frnn.Linear(4, 2), "a": frnn.ModuleList([frnn.Linear(4, 1), frnn.Linear(4, 1)])}
        )

    def __call__(self, x: Any) -> Any:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = x + self.blocks[-1](x) * len(self.blocks)
        first, second = self.heads["a"]
        assert "b" in self.heads and list(self.heads) == ["b", "a"] == self.heads.keys()
        return jnp.concatenate([self.heads["b"](x), first(x), second(x)], axis=-1)


class TorchNet(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = tnn.Linear(3, 4)
        self.blocks = tnn.ModuleList(
            [tnn.Sequential(tnn.Linear(4, 4), tnn.SiLU()) for _ in range(3)]
        )
        self.heads = tnn.ModuleDict(
            {"b": tnn.Linear(4, 2), "a": tnn.ModuleList([tnn.Linear(4, 1), tnn.Linear(4, 1)])}
        )

    def forward(self, x: Any) -> Any:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = x + self.blocks[-1](x) * len(self.blocks)
        first, second = self.heads["a"]
        return torch.cat([self.heads["b"](x), first(x), second(x)], dim=-1)


def test_nested_module_list_and_dict_match_torch() -> None:
    torch.manual_seed(0)
    ours, theirs = Net(), TorchNet()
    variables = load(ours, theirs)
    assert_state_dict_matches(ours, variables, theirs)  # keys in torch's (insertion) order
    assert list(fr.state_dict(ours, variables))[-4:] == [
        "heads.a.0.weight",
        "heads.a.0.bias",
        "heads.a.1.weight",
        "heads.a.1.bias",
    ]
    assert module_names(ours, variables) == torch_names(theirs)
    assert type(fr.get_submodule(ours, variables, "blocks.2.0")) is frnn.Linear
    x = randn(5, 3)
    assert_close(ours.apply(variables, x), theirs(torch.tensor(x)))
    input_and_param_grads(ours, variables, theirs, [x])


def test_indexing_iteration_and_len() -> None:
    ours, theirs = pair_sequential()
    bound = ours.bind(load(ours, theirs))
    assert len(bound) == len(theirs) == 7
    assert [type(m).__name__ for m in bound] == [type(m).__name__ for m in theirs]
    assert type(bound[-1]) is frnn.Sequential and type(bound[-1][0]) is frnn.Linear
    assert [type(m).__name__ for m in bound[1:3]] == ["ReLU", "MaxPool2d"]
    expected = torch_message(lambda: tnn.ModuleList([tnn.ReLU()])[5])
    with pytest.raises(IndexError, match=re.escape(expected)):
        frnn.ModuleList([frnn.ReLU()])[5]
    with pytest.raises(KeyError, match="its keys are \\['x'\\]"):
        frnn.ModuleDict({"x": frnn.ReLU()})["y"]


def torch_message(fn: Any) -> str:
    with pytest.raises(Exception) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize(
    ("ours", "theirs", "error"),
    [
        (lambda: frnn.Sequential(frnn.ReLU(), 1), lambda: tnn.Sequential(tnn.ReLU(), 1), TypeError),
        (lambda: frnn.ModuleList([1.5]), lambda: tnn.ModuleList([1.5]), TypeError),
        (lambda: frnn.ModuleDict({"a": "b"}), lambda: tnn.ModuleDict({"a": "b"}), TypeError),
        (
            lambda: frnn.ModuleDict({"a.b": frnn.ReLU()}),
            lambda: tnn.ModuleDict({"a.b": tnn.ReLU()}),
            KeyError,
        ),
        (
            lambda: frnn.ModuleDict({"": frnn.ReLU()}),
            lambda: tnn.ModuleDict({"": tnn.ReLU()}),
            KeyError,
        ),
    ],
)
def test_container_errors_use_torch_messages(ours: Any, theirs: Any, error: type) -> None:
    expected = torch_message(theirs)
    with pytest.raises(error, match=re.escape(expected.strip("'\""))):
        ours()


def test_positional_and_keyword_construction_agree() -> None:
    a = frnn.Sequential(frnn.Linear(2, 2), frnn.ReLU())
    b = frnn.Sequential(layers=[frnn.Linear(2, 2), frnn.ReLU()])
    assert module_names(a, fr.abstract_variables(a)) == module_names(b, fr.abstract_variables(b))
    with pytest.raises(TypeError, match="either positionally"):
        frnn.Sequential(frnn.ReLU(), layers=[frnn.ReLU()])

    class Head(frnn.Sequential):
        pass

    head = Head(frnn.Linear(2, 3), frnn.Tanh())
    assert list(fr.state_dict(head, fr.abstract_variables(head))) == ["0.weight", "0.bias"]


def test_flax_children_and_empty_containers() -> None:
    seq = frnn.Sequential(linen.Dense(3), frnn.ReLU())
    variables = seq.init(jax.random.key(0), jnp.ones((1, 2)))
    assert list(fr.state_dict(seq, variables)) == ["0.kernel", "0.bias"]  # flax's own names
    assert module_names(seq, variables) == ["", "0", "1"]
    empty = frnn.Sequential()
    assert_close(empty.apply({}, jnp.ones(3)), np.ones(3))
    for ours, theirs in [
        (frnn.ModuleList(), tnn.ModuleList()),
        (frnn.ModuleDict(), tnn.ModuleDict()),
    ]:
        variables = fr.abstract_variables(ours)
        assert fr.state_dict(ours, variables) == theirs.state_dict() == {}
        assert module_names(ours, variables) == torch_names(theirs) == [""]


def test_a_module_shared_by_two_positions_is_one_module_as_in_torch() -> None:
    torch.manual_seed(0)
    shared_t = tnn.Linear(2, 2)
    theirs = tnn.Sequential(shared_t, tnn.ReLU(), shared_t)
    shared = frnn.Linear(2, 2)
    ours = frnn.Sequential(shared, frnn.ReLU(), shared)
    variables = load(ours, theirs)
    assert_state_dict_matches(ours, variables, theirs)  # both aliases, as torch
    assert module_names(ours, variables) == torch_names(theirs)  # listed once
    assert [n for n, _ in fr.named_parameters(ours, variables)] == ["0.weight", "0.bias"]
    input_and_param_grads(ours, variables, theirs, [randn(3, 2)])
