"""The structure cache (`_linen.structure`, `_linen.definition`): a re-filled tree is the tree a
build gives, with the values of the call; a changed definition is read afresh; a definition
that cannot be vouched for is never cached."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_registry as fr
from flax_registry import nn
from flax_registry._linen import structure
from flax_registry._linen import tree as linen_tree
from flax_registry._linen.definition import fingerprint


class Shared(fr.Module):
    """A submodule under two names, a tie, a non-persistent buffer, flax layers beside."""

    def setup(self) -> None:
        self.emb = nn.Embedding(7, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.again = self.block
        self.head = nn.Linear(4, 7, bias=False)
        self.tie_parameters("head.weight", "emb.weight")
        self.dense = linen.Dense(3)
        self.register_buffer("scale", jnp.full((2,), 3.0), persistent=False)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.dense(self.head(self.again(self.emb(ids))))


def _models() -> list[tuple[str, Any, Any]]:
    shared = Shared()
    ids = jnp.zeros((2,), jnp.int32)
    return [
        ("shared", shared, shared.init(jax.random.key(0), ids)),
        (
            "list",
            nn.ModuleList([nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)) for _ in range(4)]),
            None,
        ),
        ("dict", nn.ModuleDict({"a": nn.Linear(2, 3), "b": nn.LayerNorm(3)}), None),
    ]


def _listings(model: Any, variables: Any) -> dict[str, Any]:
    return {
        "parameters": list(fr.named_parameters(model, variables)),
        "parameters_all": list(fr.named_parameters(model, variables, remove_duplicate=False)),
        "buffers": list(fr.named_buffers(model, variables, prefix="p")),
        "own": list(fr.named_parameters(model, variables, recurse=False)),
        "state_dict": list(fr.state_dict(model, variables, prefix="x.").items()),
        "modules": [(n, type(m).__name__) for n, m in fr.named_modules(model, variables)],
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same names in the same order, each value the same object."""
    for kind in a:
        if [n for n, _ in a[kind]] != [n for n, _ in b[kind]]:
            return False
        if kind == "modules":
            if a[kind] != b[kind]:
                return False
        elif any(x is not y for (_, x), (_, y) in zip(a[kind], b[kind])):
            return False
    return True


@pytest.mark.parametrize(
    "name, model, variables", _models(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_refilled_trees_equal_built_trees_with_this_calls_values(
    name: str, model: Any, variables: Any
) -> None:
    variables = variables if variables is not None else fr.init_variables(model, jax.random.key(0))
    structure.clear()
    built = _listings(model, variables)  # built (and cached)
    cached = _listings(model, variables)
    assert _same(built, cached)
    other = jax.tree.map(lambda x: x + 1, variables)  # same structure, new values
    structure.clear()
    expected = _listings(model, other)
    assert _same(_listings(model, other), expected)
    assert all(v is not w for (_, v), (_, w) in zip(cached["state_dict"], expected["state_dict"]))
    state = fr.state_dict(model, other)
    loaded, _ = fr.load_state_dict(model, variables, state)  # through the cached structure
    assert all(v is state[k] for k, v in fr.state_dict(model, loaded).items())


def test_modules_of_a_refilled_tree_are_bound_to_this_calls_variables() -> None:
    model = Shared()
    variables = model.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    fr.state_dict(model, variables)
    other = jax.tree.map(lambda x: x * 2, variables)
    modules = dict(fr.named_modules(model, other))
    assert type(modules["block.0"]).__name__ == "Linear"
    assert modules["block.0"].weight is other["params"]["block"]["layers_0"]["weight"]
    assert (
        fr.get_submodule(model, other, "dense").variables["params"]["kernel"]
        is (other["params"]["dense"]["kernel"])
    )


def test_each_call_reads_one_tree_also_from_the_cache() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    variables = fr.init_variables(model, jax.random.key(0))
    structure.clear()
    for _ in range(3):  # a build, then re-fills: one each
        before = linen_tree.BUILDS["count"]
        fr.state_dict(model, variables)
        list(fr.named_modules(model, variables))
        assert linen_tree.BUILDS["count"] - before == 2


def test_a_changed_definition_is_read_afresh() -> None:
    layers = [nn.Linear(2, 3)]
    model = nn.ModuleList(layers)
    v1 = fr.init_variables(model, jax.random.key(0))
    assert list(fr.state_dict(model, v1)) == ["0.weight", "0.bias"]
    first = fingerprint(model)
    layers.append(nn.Linear(3, 1))  # the list the module holds changed: another definition
    assert fingerprint(model) != first
    v2 = fr.init_variables(model, jax.random.key(0))
    assert list(fr.state_dict(model, v2)) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert fingerprint(nn.Linear(2, 3, bias=False)) != fingerprint(nn.Linear(2, 3))
    assert fingerprint(nn.Linear(2, 3)) == fingerprint(nn.Linear(2, 3))  # by value
    assert fingerprint(nn.Linear(2, 3, bias=1)) != fingerprint(nn.Linear(2, 3, bias=True))


def test_a_replaced_setup_is_read_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    class Net(fr.Module):
        def setup(self) -> None:
            self.register_buffer("a", jnp.zeros(2))

    model = Net()
    assert list(fr.state_dict(model, fr.init_variables(model, jax.random.key(0)))) == ["a"]

    def setup(self: Any) -> None:
        self.register_buffer("a", jnp.zeros(2))
        self.register_buffer("b", jnp.zeros(2))

    monkeypatch.setattr(Net, "setup", setup)
    variables = fr.init_variables(model, jax.random.key(0))
    assert list(fr.state_dict(model, variables)) == ["a", "b"]


class _Config:  # a mutable object with identity hashing, as a config object
    def __init__(self, width: int) -> None:
        self.width = width


class Configured(fr.Module):
    config: Any

    def setup(self) -> None:
        self.layers = [nn.Linear(2, 2) for _ in range(self.config.width)]


def test_a_definition_holding_an_unknown_object_is_not_cached() -> None:
    config = _Config(1)
    model = Configured(config)
    assert fingerprint(model) is None
    assert len(fr.state_dict(model, fr.init_variables(model, jax.random.key(0)))) == 2
    config.width = 2  # the object changed in place: nothing stale
    assert len(fr.state_dict(model, fr.init_variables(model, jax.random.key(0)))) == 4
    assert fingerprint(nn.Embedding(3, 2, pretrained=np.ones((3, 2), np.float32))) is None


@dataclasses.dataclass(frozen=True)
class _Frozen:
    width: int


def test_frozen_dataclass_fields_are_read_by_value() -> None:
    assert fingerprint(Configured(_Frozen(1))) == fingerprint(Configured(_Frozen(1)))
    assert fingerprint(Configured(_Frozen(1))) != fingerprint(Configured(_Frozen(2)))


def test_variables_that_no_longer_fit_raise_as_without_the_cache() -> None:
    model = nn.Linear(3, 2)
    variables = fr.init_variables(model, jax.random.key(0))
    fr.state_dict(model, variables)  # cached
    wrong = {"params": {"weight": jnp.zeros((2, 4)), "bias": jnp.zeros(2)}}
    with pytest.raises(Exception, match="shape"):
        fr.state_dict(model, wrong)
    structure.clear()
    with pytest.raises(Exception, match="shape"):
        fr.state_dict(model, wrong)


def test_fallback_values_are_never_cached() -> None:
    class Net(fr.Module):
        def setup(self) -> None:
            self.register_buffer("table", jnp.arange(3.0), persistent=False)
            self.register_buffer("kept", jnp.ones(2))

    model = Net()
    without = {"buffers": {"kept": jnp.ones(2)}}  # the non-persistent buffer recomputed
    for _ in range(2):
        buffers = dict(fr.named_buffers(model, without))
        np.testing.assert_array_equal(buffers["table"], np.arange(3.0))
    given = {"buffers": {"kept": jnp.ones(2), "table": jnp.full(3, 7.0)}}
    for _ in range(2):
        np.testing.assert_array_equal(dict(fr.named_buffers(model, given))["table"], 7.0)


def test_abstract_variables_are_fresh_trees_of_the_cached_shapes() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    first = fr.abstract_variables(model)
    first["params"].clear()  # the caller's tree is its own
    second = fr.abstract_variables(model)
    assert second == jax.eval_shape(lambda: fr.init_variables(model, jax.random.key(0)))


def test_torch_view_cache_gives_this_calls_values() -> None:
    model = Shared()
    variables = model.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    first = fr.to_torch(model, variables)
    other = jax.tree.map(lambda x: x - 1, variables)
    second = fr.to_torch(model, other)
    assert list(first) == list(second)
    for key in first:
        np.testing.assert_array_equal(second[key], np.asarray(first[key]) - 1)
    state = {k: torch.from_numpy(np.array(v)) for k, v in second.items()}
    back, report = fr.from_torch(model, state, variables=variables)
    assert report.ok
    expected = fr.state_dict(model, other)  # the non-persistent buffer is not in a state dict
    for key, value in fr.state_dict(model, back).items():
        np.testing.assert_array_equal(value, expected[key])
