"""CheckpointManager for models without buffers (an MLP, an LSTM, a transformer layer) and for
a model whose only buffers are non-persistent: save, restart, restore, continue bit-identically
(with the default, donating train step), and no orbax tmp folder or error left behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_registry as fr
from flax_registry import train
from flax_registry.checkpoint import CheckpointManager
from flax_registry.nn import LSTM, Linear, TransformerEncoderLayer


class MLP(fr.Module):
    def setup(self) -> None:
        self.fc1 = Linear(3, 8)
        self.fc2 = Linear(8, 2)

    def __call__(self, x: Any) -> Any:
        return self.fc2(jax.nn.relu(self.fc1(x)))


class MaskedMLP(MLP):
    """Its only buffer is non-persistent: the saved `buffers` item would be empty."""

    def setup(self) -> None:
        super().setup()
        self.register_buffer("mask", jnp.array([1.0, 0.0, 1.0]), persistent=False)

    def __call__(self, x: Any) -> Any:
        return super().__call__(x * self.mask)


def mse(model: Any, batch: Any) -> Any:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _batches(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (
            rng.standard_normal((4, 3)).astype(np.float32),
            rng.standard_normal((4, 2)).astype(np.float32),
        )
        for _ in range(n)
    ]


def _fields(state: train.TrainState) -> Any:
    return (state.step, state.params, state.buffers, state.opt_state, state.rng)


def _assert_identical(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


TX = train.torch_adam(1e-2)
STEP = train.make_train_step(mse)  # the default: donates its input state


@pytest.mark.parametrize("cls", [MLP, MaskedMLP])
def test_save_restart_restore_continue(tmp_path: Path, cls: type[MLP]) -> None:
    data = _batches(4)
    key = jax.random.key(5, impl="rbg")
    variables = fr.init_variables(cls(), jax.random.key(0))
    straight = train.create_train_state(cls(), variables, TX, rng=key)
    for batch in data:
        straight, _ = STEP(straight, batch)

    first = train.create_train_state(cls(), variables, TX, rng=key)
    with CheckpointManager(tmp_path, cls()) as manager:
        for i, batch in enumerate(data[:2]):
            first, _ = STEP(first, batch)
            assert manager.save(i + 1, first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # no *.orbax-checkpoint-tmp
    saved = jax.tree.map(np.array, first.variables)
    del first, manager

    module = cls()  # "restart": a new module, a new manager, an abstract target
    with CheckpointManager(tmp_path, module) as manager:
        meta = manager.metadata()
        assert meta["empty_items"] == ["buffers"] and "buffers" not in meta["items"]
        target = train.create_train_state(module, fr.abstract_variables(module), TX, rng=key)
        resumed = manager.restore(target)
        again = manager.restore(target)  # a second restore after the first one was donated
        for batch in data[2:]:
            resumed, _ = STEP(resumed, batch)
        _assert_identical(_fields(resumed), _fields(straight))
        for batch in data[2:]:
            again, _ = STEP(again, batch)
        _assert_identical(_fields(again), _fields(straight))
        restored = manager.restore_variables()
    _assert_identical(restored, saved)


@pytest.mark.parametrize(
    "module",
    [LSTM(3, 4, num_layers=2), TransformerEncoderLayer(8, 2, dim_feedforward=16)],
    ids=["lstm", "transformer"],
)
def test_variables_round_trip_without_buffers(tmp_path: Path, module: Any) -> None:
    variables = fr.init_variables(module, jax.random.key(1))
    assert set(variables) == {"params"}
    with CheckpointManager(tmp_path, module, enable_async=False) as manager:
        assert manager.save(3, variables)
        _assert_identical(manager.restore_variables(), variables)


def test_empty_item_must_stay_empty(tmp_path: Path) -> None:
    """A checkpoint saved without buffers does not restore into a model that has some."""
    variables = fr.init_variables(MLP(), jax.random.key(0))
    with CheckpointManager(tmp_path, MLP(), enable_async=False) as manager:
        manager.save(1, variables)

    class WithBuffer(MLP):
        def setup(self) -> None:
            super().setup()
            self.register_buffer("count", jnp.zeros(()))

    with (
        CheckpointManager(tmp_path, WithBuffer()) as manager,
        pytest.raises(ValueError, match='Missing key\\(s\\) in checkpoint: "count"'),
    ):
        manager.restore_variables()
