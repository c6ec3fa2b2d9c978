"""Traps a new user falls into: the donating train step must not delete arrays the user still
holds, and a model whose `__call__` takes no `train` must not silently train BatchNorm or
Dropout in eval mode."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_registry as fr
from flax_registry import train
from flax_registry.nn import BatchNorm1d, Dropout, LayerNorm, Linear

TX = train.torch_sgd(0.1)


def mse(model: Any, batch: Any) -> Any:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


BATCH = (
    np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32),
    np.zeros((8, 2), np.float32),
)


class BNNet(fr.Module):
    """Takes `train` and passes it on: the convention."""

    def setup(self) -> None:
        self.fc = Linear(4, 2)
        self.bn = BatchNorm1d(2)

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        return self.bn(self.fc(x), train=train)


class NoTrainArg(BNNet):
    """The trap: no `train` argument, so BatchNorm always runs with its default (eval)."""

    def __call__(self, x: Any) -> Any:  # type: ignore[override]
        return self.bn(self.fc(x))


class NoTrainDropout(fr.Module):
    def setup(self) -> None:
        self.fc = Linear(4, 2)
        self.drop = Dropout(0.5)

    def __call__(self, x: Any) -> Any:
        return self.drop(self.fc(x))


class NoTrainLayerNorm(fr.Module):
    """LayerNorm takes `train` but ignores it (as in PyTorch): nothing to warn about."""

    def setup(self) -> None:
        self.fc = Linear(4, 2)
        self.norm = LayerNorm(2)

    def __call__(self, x: Any) -> Any:
        return self.norm(self.fc(x))


# -- donation ------------------------------------------------------------------------------------


def test_donating_step_keeps_the_callers_variables() -> None:
    module = BNNet()
    variables = fr.init_variables(module, jax.random.key(0))
    before = jax.tree.map(np.array, variables)
    step = train.make_train_step(mse)  # donate=True, the default
    state, _ = step(train.create_train_state(module, variables, TX), BATCH)
    state, _ = step(state, BATCH)
    # the variables the state was built from are intact and usable
    assert not any(x.is_deleted() for x in jax.tree.leaves(variables))
    sd = fr.state_dict(module, variables)
    assert set(sd) == {
        "fc.weight",
        "fc.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, variables), before)
    # a second state from the same variables trains exactly as the first did
    second, _ = step(train.create_train_state(module, variables, TX), BATCH)
    second, _ = step(second, BATCH)
    jax.tree.map(np.testing.assert_array_equal, second.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, second.buffers, state.buffers)
    # donation still happens for what the state owns: the previous state is consumed
    third, _ = step(second, BATCH)
    assert all(x.is_deleted() for x in jax.tree.leaves(second.params))
    assert not any(x.is_deleted() for x in jax.tree.leaves(third.params))


def test_state_copies_keep_the_sharding() -> None:
    module = BNNet()
    variables = fr.init_variables(module, jax.random.key(0))
    device = jax.devices()[-1]
    placed = jax.device_put(variables, device)
    state = train.create_train_state(module, placed, TX)
    for ours, theirs in zip(jax.tree.leaves(state.params), jax.tree.leaves(placed["params"])):
        assert ours.sharding == theirs.sharding and ours.committed == theirs.committed
        assert ours.unsafe_buffer_pointer() != theirs.unsafe_buffer_pointer()


# -- a top-level __call__ without `train` ---------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "layer"),
    [(NoTrainArg, "BatchNorm1d 'bn'"), (NoTrainDropout, "Dropout 'drop'")],
    ids=["batchnorm", "dropout"],
)
def test_no_train_argument_is_refused(cls: type[fr.Module], layer: str) -> None:
    module = cls()
    state = train.create_train_state(module, fr.init_variables(module, jax.random.key(0)), TX)
    step = train.make_train_step(mse)
    with pytest.raises(TypeError, match=rf"{cls.__name__}.__call__ takes no `train`.*{layer}"):
        step(state, BATCH)


def test_the_convention_trains_batchnorm_and_eval_mode_on_purpose_is_allowed() -> None:
    for module, kwargs, counted in ((BNNet(), None, 1), (NoTrainArg(), {}, 0)):
        variables = fr.init_variables(module, jax.random.key(0))
        state = train.create_train_state(module, variables, TX)
        state, _ = train.make_train_step(mse, call_kwargs=kwargs)(state, BATCH)
        tracked = fr.state_dict(module, state.variables)["bn.num_batches_tracked"]
        assert int(tracked) == counted  # 1: statistics updated; 0: eval mode, as asked


def test_layers_whose_train_has_no_effect_are_not_refused() -> None:
    module = NoTrainLayerNorm()
    state = train.create_train_state(module, fr.init_variables(module, jax.random.key(0)), TX)
    state, metrics = train.make_train_step(mse)(state, BATCH)
    assert int(state.step) == 1 and jnp.isfinite(metrics["loss"])
