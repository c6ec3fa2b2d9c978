"""The train-state sharding vocabulary, in one process: PyTorch names (globs, exact names,
flax paths) choose PartitionSpecs for parameters, buffers and, by their parameter's name,
optimizer state; FULLY_SHARDED splits the largest dimension the axis divides; a step on a mesh
refuses a batch that is not split over it; errors name the key and the fix; the docstring
examples run. (The same on 8 devices, with values: `test_sharded_training.py`.)"""

from __future__ import annotations

import doctest
import importlib

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

import flax_registry as fr
from flax_registry import train
from flax_registry._nested import get

from .models import Net, batches, cross_entropy

MESH = AbstractMesh((8, 2), ("data", "model"))  # shardings only: no devices needed


def _abstract() -> train.TrainState:
    module = Net(channels=8, classes=4)
    return train.create_train_state(module, fr.abstract_variables(module), train.torch_adamw())


def _specs(placed: train.TrainState) -> dict[str, PartitionSpec]:
    """The spec of every parameter, buffer and Adam first moment, by PyTorch name."""
    abstract = _abstract()
    inner = placed.opt_state.inner_states["default"].inner_state
    out = {}
    for (collection, path), info in train.variable_names(abstract.module, abstract.variables).items():  # fmt: skip
        out[info.name] = get(placed.variables[collection], path).spec
        if collection == "params":
            out[f"exp_avg/{info.name}"] = get(inner.exp_avg, path).spec
    return out


def test_fully_sharded_splits_the_largest_divisible_dimension() -> None:
    specs = _specs(train.train_state_shardings(_abstract(), MESH, train.FULLY_SHARDED))
    assert specs["conv1.weight"] == PartitionSpec("data")  # (8, 3, 3, 3)
    assert specs["fc.weight"] == PartitionSpec(None, "data")  # (4, 8): only dim 1 divides
    assert specs["fc.bias"] == PartitionSpec()  # (4,): nothing divides by 8, replicated
    assert specs["exp_avg/fc.weight"] == specs["fc.weight"]
    assert specs["bn1.running_mean"] == PartitionSpec()  # buffers replicated, as in FSDP
    big = AbstractMesh((2, 4), ("data", "model"))  # over both axes: 8 parts again
    both = _specs(train.train_state_shardings(_abstract(), big, train.FULLY_SHARDED, axis=("data", "model")))  # fmt: skip
    assert both["conv2.weight"] == PartitionSpec(("data", "model"))
    wide = _specs(train.train_state_shardings(_abstract(), MESH, train.FULLY_SHARDED, axis=("data", "model")))  # fmt: skip
    assert wide["conv2.weight"] == PartitionSpec()  # (8, 8, 3, 3): nothing divides by 16


def test_rules_by_pytorch_name_override_the_strategy() -> None:
    rules = {
        "conv2.weight": PartitionSpec("model"),  # an exact name
        "params/fc/bias": PartitionSpec("model"),  # a flax path
        "bn*.running_*": PartitionSpec("data"),  # a glob, over buffers
    }
    placed = train.train_state_shardings(_abstract(), MESH, train.DATA_PARALLEL, rules=rules)
    specs = _specs(placed)
    assert specs["conv2.weight"] == specs["exp_avg/conv2.weight"] == PartitionSpec("model")
    assert specs["fc.bias"] == specs["exp_avg/fc.bias"] == PartitionSpec("model")
    assert specs["bn2.running_var"] == PartitionSpec("data")
    assert specs["conv1.weight"] == PartitionSpec()  # data-parallel: replicated
    assert placed.step.spec == placed.rng.spec == PartitionSpec()
    # a ShardingSpec as the strategy applies to every named array, buffers included
    spec = fr.checkpoint.sharding_rules(MESH, [("*.weight", PartitionSpec("data"))])  # type: ignore[arg-type]
    spec_specs = _specs(train.train_state_shardings(_abstract(), MESH, spec))
    assert spec_specs["bn1.weight"] == spec_specs["exp_avg/bn1.weight"] == PartitionSpec("data")
    assert spec_specs["bn1.running_mean"] == PartitionSpec()


def test_errors_name_what_was_given_and_the_fix() -> None:
    state = _abstract()
    with pytest.raises(ValueError, match=r"shardings must be 'data_parallel', 'fully_sharded' or a ShardingSpec .* got 'fsdp'"):  # fmt: skip
        train.train_state_shardings(state, MESH, "fsdp")
    with pytest.raises(ValueError, match=r"mesh axis 'batch' is not an axis of the mesh \(axes \('data', 'model'\)\): pass axis="):  # fmt: skip
        train.train_state_shardings(state, MESH, train.FULLY_SHARDED, axis="batch")
    with pytest.raises(ValueError, match=r"batch leaf '1/image' has shape \(12, 2\), but its leading axis is split over mesh axis data of 8 devices: make the batch size a multiple of 8"):  # fmt: skip
        train.shard_batch((np.zeros(8), {"image": np.zeros((12, 2))}), MESH)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    module = Net()
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), fr.abstract_variables(module))
    concrete = train.create_train_state(module, zeros, train.torch_sgd(0.1))
    on_mesh = train.shard_train_state(concrete, mesh)
    with pytest.raises(ValueError, match=r"batch leaf '0' \(shape \(4, 3, 6, 6\)\) is a host array, but the train state is on the mesh \{'data': 1\}: .* Place it with flax_registry.train.shard_batch"):  # fmt: skip
        train.make_train_step(cross_entropy)(on_mesh, batches(1)[0])


@pytest.mark.parametrize(
    "name", ["flax_registry.train._sharding", "flax_registry.train._batch", "flax_registry.train._precision"]
)  # fmt: skip
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0
