"""`abstract_variables` without inputs declares the registry's variables instead of tracing
`init` (`_linen.declare.declared_init`): the result must be what the traced `init` gives,
leaf for leaf (shape, dtype, weak type), and a model the declaration cannot vouch for (a flax
layer's own `self.param`) is traced as before, with the same result."""

from __future__ import annotations

from typing import Any

import flax.errors
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_registry as fr
from flax_registry import nn
from flax_registry._linen import adapter, declare
from flax_registry._linen.module import setup_all


class Buffers(fr.Module):
    """Every kind of buffer and parameter initial value the registry accepts."""

    def setup(self) -> None:
        self.register_buffer("from_jax", jnp.arange(3.0))
        self.register_buffer("weak", jnp.asarray(2.0))  # a weakly typed JAX scalar
        self.register_buffer("from_numpy", np.arange(4, dtype=np.int64))
        self.register_buffer("float64", np.ones((2, 2)))  # canonicalised to float32
        self.register_buffer("from_callable", lambda: jnp.zeros((5,), jnp.bfloat16))
        self.register_buffer("by_init", linen.initializers.ones, shape=(2, 3), dtype=jnp.int32)
        self.register_buffer("transient", jnp.ones((2,)), persistent=False)
        self.register_buffer("absent", None)
        self.register_parameter("scale", fr.Parameter(linen.initializers.ones, (3,)))
        self.register_parameter(
            "half", fr.Parameter(linen.initializers.normal(), (2, 4), dtype=jnp.bfloat16)
        )
        self.register_parameter("given", fr.Parameter(jnp.full((2,), 7.0)))
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
        self.head = nn.Linear(4, 3, bias=False)
        self.tie_parameters("head.weight", "body.0.weight")  # not the same shape: not used

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.body(x)


class Tied(fr.Module):
    def setup(self) -> None:
        self.emb = nn.Embedding(11, 4)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))] * 2)
        self.head = nn.Linear(4, 11, bias=False)
        self.tie_parameters("head.weight", "emb.weight")


class WithFlaxParameter(fr.Module):
    """A flax parameter of its own (`self.param` draws from the init rng): only a traced
    `init` can create it."""

    def setup(self) -> None:
        self.norm = nn.LayerNorm(4)
        self.dense = linen.Dense(3)  # compact: created on call, in neither pass
        self.own = self.param("own", linen.initializers.normal(), (4, 2))


def _traced(module: Any) -> Any:
    with declare.abstract_mode():
        return jax.eval_shape(lambda: module.init(jax.random.key(0), method=setup_all))


def _described(tree: Any) -> list[tuple[str, tuple[int, ...], str, bool]]:
    return [
        (jax.tree_util.keystr(path), leaf.shape, str(leaf.dtype), bool(leaf.weak_type))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


MODELS = {
    "buffers": lambda: Buffers(),
    "tied": lambda: Tied(),
    "conv-net": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)
    ),
    "bfloat16": lambda: nn.Linear(4, 3, dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_declared_equals_traced(name: str) -> None:
    if name == "buffers":  # the mismatched tie raises in both: the message is the same
        module = MODELS[name]()
        with pytest.raises(ValueError) as declared:
            declare.declared_init(module, setup_all)
        with pytest.raises(ValueError) as traced:
            _traced(module)
        assert str(declared.value) == str(traced.value)
        return
    module = MODELS[name]()
    declared, _ = declare.declared_init(module, setup_all)
    assert _described(declared) == _described(_traced(module))


def test_every_kind_of_initial_value() -> None:
    class Untied(Buffers):
        def setup(self) -> None:
            self.tie_parameters = lambda *args: None  # type: ignore[method-assign]
            super().setup()

    module = Untied()
    declared, _ = declare.declared_init(module, setup_all)
    assert _described(declared) == _described(_traced(module))
    assert "transient" in declared["buffers"]  # held at apply time, left out of state_dict
    assert "transient" not in fr.state_dict(module, fr.init_variables(module, jax.random.key(0)))


def test_what_only_a_trace_can_do_is_traced(monkeypatch: pytest.MonkeyPatch) -> None:
    module = WithFlaxParameter()
    with pytest.raises(flax.errors.InvalidRngError):  # the caller then traces
        declare.declared_init(module, setup_all)
    adapter._ABSTRACT.clear()
    traced = []
    original = jax.eval_shape

    def counting(*args: Any, **kwargs: Any) -> Any:
        traced.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter.jax, "eval_shape", counting)
    out = fr.abstract_variables(module)
    assert traced  # it fell back to the trace
    assert _described(out) == _described(_traced(module))
