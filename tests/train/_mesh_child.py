"""Child process of the mesh test, run with JAX_NUM_CPU_DEVICES=8: reads a checkpoint first
with plain orbax (flax_registry not imported), then restores it through flax_registry onto
a (4, 2) mesh, and checks shardings and values against the expected arrays."""

import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "8"

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

RULES = [
    ("conv1.weight", PartitionSpec("data")),
    ("conv2.weight", PartitionSpec("data", "model")),
    ("fc.weight", PartitionSpec("model", "data")),
    ("bn*.running_*", PartitionSpec("data")),
]


def main(directory: str, expected_file: str) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    expected = dict(np.load(expected_file))
    # 1. plain orbax, no flax_registry: params restored onto the mesh from an abstract tree
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = {}
    for key, value in expected.items():
        if key.startswith("params/"):
            node = abstract
            *parents, leaf = key.split("/")[1:]
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=replicated)
    plain = ocp.CheckpointManager(directory).restore(
        1, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
    )
    assert "flax_registry" not in sys.modules
    for key, value in expected.items():
        if key.startswith("params/"):
            leaf = plain["params"]
            for part in key.split("/")[1:]:
                leaf = leaf[part]
            np.testing.assert_array_equal(np.asarray(leaf), value, err_msg=key)
            assert leaf.sharding == replicated

    # 2. flax_registry: sharded by dotted-name rules, optimizer state like its parameters
    import flax_registry as fr
    from flax_registry import train
    from flax_registry.checkpoint import CheckpointManager, sharding_rules

    from .models import Net

    module = Net(channels=8, classes=4)
    manager = CheckpointManager(directory, module)
    rules = sharding_rules(mesh, RULES)
    target = train.create_train_state(module, fr.abstract_variables(module), train.torch_adamw())
    state = manager.restore(target, shardings=rules)
    named = dict(fr.named_parameters(module, state.variables))
    named.update(fr.named_buffers(module, state.variables))
    for name, spec in [(n, s) for n, s in RULES if "*" not in n] + [
        ("bn1.running_mean", PartitionSpec("data")),
        ("bn2.running_var", PartitionSpec("data")),
        ("fc.bias", PartitionSpec()),
    ]:
        assert named[name].sharding == NamedSharding(mesh, spec), (name, named[name].sharding)
        assert len(named[name].sharding.device_set) == 8
    for name, value in named.items():
        np.testing.assert_array_equal(np.asarray(value), expected["torch/" + name], err_msg=name)
    mu = state.opt_state.inner_states["default"].inner_state.exp_avg["conv2"]["weight"]
    assert mu.sharding == NamedSharding(mesh, PartitionSpec("data", "model"))
    np.testing.assert_array_equal(np.asarray(mu), expected["exp_avg/conv2.weight"])
    # shardings carried by the abstract target itself
    on_mesh = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), target.params
    )
    again = manager.restore(target.replace(params=on_mesh))
    assert again.params["conv2"]["weight"].sharding == replicated
    np.testing.assert_array_equal(
        np.asarray(again.params["conv2"]["weight"]), expected["torch/conv2.weight"]
    )
    variables = manager.restore_variables(shardings=rules)
    assert variables["params"]["fc"]["weight"].sharding == NamedSharding(
        mesh, PartitionSpec("model", "data")
    )
    print("MESH OK")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
