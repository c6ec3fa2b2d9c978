"""Child process of the sharded-training tests, run with JAX_NUM_CPU_DEVICES=8 (the device
count is fixed when jax starts): 5 steps on one device, data-parallel on 8 devices, fully
sharded on 8 devices and with per-replica BatchNorm on a (4, 2) mesh (also accumulating over
2 micro-batches per replica), each compared after
every step with the single-device run and with PyTorch's runs the parent computed (read from
`expected.npz`); the shardings are checked after every step. Prints one JSON line of
measurements, then `SHARDED OK`."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ["JAX_NUM_CPU_DEVICES"] = "8"

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import flax_registry as fr
from flax_registry import train

from .nets import Net, batches, cross_entropy

STEPS, BATCH = 5, 16
TOL = {"rtol": 1e-5, "atol": 1e-5}


def named(module: Any, state: train.TrainState) -> dict[str, np.ndarray]:
    """Parameters, buffers and Adam's moments of `state` by PyTorch name."""
    out = {f"param/{k}": np.asarray(v) for k, v in fr.named_parameters(module, state.variables)}
    out.update({f"buffer/{k}": np.asarray(v) for k, v in fr.named_buffers(module, state.variables)})
    inner = state.opt_state.inner_states["default"].inner_state
    for field in ("exp_avg", "exp_avg_sq"):
        moments = {**state.variables, "params": getattr(inner, field)}
        out.update({f"{field}/{k}": np.asarray(v) for k, v in fr.named_parameters(module, moments)})
    return out


def compare(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], what: str) -> float:
    assert set(ours) == set(theirs), (what, set(ours) ^ set(theirs))
    worst = 0.0
    for key, value in theirs.items():
        if value.dtype.kind in "iu":
            np.testing.assert_array_equal(ours[key], value, err_msg=f"{what}: {key}")
            continue
        np.testing.assert_allclose(ours[key], value, **TOL, err_msg=f"{what}: {key}")
        worst = max(worst, float(np.abs(ours[key] - value).max()))
    return worst


def expected_at(expected: dict[str, np.ndarray], run: str, step: int) -> dict[str, np.ndarray]:
    prefix = f"{run}/{step}/"
    return {k[len(prefix) :]: v for k, v in expected.items() if k.startswith(prefix)}


def check_placement(state: train.TrainState, wanted: train.TrainState, what: str) -> None:
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(wanted), strict=True
    ):
        assert leaf.sharding == sharding, (what, jax.tree_util.keystr(path), leaf.sharding)


def run(
    module: Net,
    state: train.TrainState,
    mesh: Any,
    strategy: str,
    expected: dict[str, np.ndarray],
    reference: list[dict[str, np.ndarray]] | None,
    torch_run: str,
    **step_kw: Any,
) -> dict[str, Any]:
    step = train.make_train_step(cross_entropy, **step_kw)
    state = train.shard_train_state(state, mesh, strategy)
    wanted = train.train_state_shardings(state, mesh, strategy)
    check_placement(state, wanted, f"{strategy} placed")
    worst_single, worst_torch = 0.0, 0.0
    for i, (x, y) in enumerate(batches(STEPS, batch=BATCH, seed=1)):
        old = state
        state, metrics = step(state, train.shard_batch((x, y), mesh))
        if i == 0:  # donated, not copied (reading an array, as below, pins it on CPU)
            assert all(a.is_deleted() for a in jax.tree.leaves(old.params)), strategy
        check_placement(state, wanted, f"{strategy} step {i}")
        ours = named(module, state)
        if reference is not None:
            worst_single = max(worst_single, compare(ours, reference[i], f"{strategy} vs 1 device"))
        theirs = expected_at(expected, torch_run, i)
        loss = theirs.pop("loss")
        worst_torch = max(worst_torch, compare(ours, theirs, f"{strategy} vs torch step {i}"))
        np.testing.assert_allclose(float(metrics["loss"]), float(loss), **TOL)
    return {"state": state, "vs_single": worst_single, "vs_torch": worst_torch}


def main(expected_file: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    expected = dict(np.load(expected_file))
    module = Net(channels=8, classes=4)
    initial = {k[len("init/") :]: v for k, v in expected.items() if k.startswith("init/")}
    variables, result = fr.load_state_dict(module, fr.abstract_variables(module), initial)
    assert not result.missing_keys and not result.unexpected_keys
    tx = train.torch_adamw(1e-2, weight_decay=0.1)
    start = train.create_train_state(module, variables, tx, rng=jax.random.key(0, impl="rbg"))

    # one device: the reference of the sharded runs
    single_step = train.make_train_step(cross_entropy, donate=False)
    single, state, worst = [], start, 0.0
    for i, (x, y) in enumerate(batches(STEPS, batch=BATCH, seed=1)):
        state, _ = single_step(state, (x, y))
        single.append(named(module, state))
        theirs = expected_at(expected, "global", i)
        theirs.pop("loss")
        worst = max(worst, compare(single[-1], theirs, f"1 device vs torch step {i}"))
    report: dict[str, Any] = {"single_vs_torch": worst}

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    copy = lambda s: jax.tree.map(np.array, s)  # noqa: E731  (the runs donate their input)
    dp = run(module, copy(start), mesh, train.DATA_PARALLEL, expected, single, "global")
    fs = run(module, copy(start), mesh, train.FULLY_SHARDED, expected, single, "global")
    report["data_parallel"] = {k: dp[k] for k in ("vs_single", "vs_torch")}
    report["fully_sharded"] = {k: fs[k] for k in ("vs_single", "vs_torch")}

    # memory: what each device holds of the parameters and the optimizer state
    total = sum(np.asarray(x).nbytes for x in jax.tree.leaves((start.params, start.opt_state)))
    for name, result in (("data_parallel", dp), ("fully_sharded", fs)):
        held = train.bytes_per_device((result["state"].params, result["state"].opt_state))
        report[name]["max_device_bytes"] = max(held.values())
        report[name]["total_bytes"] = total
    fs_params = fs["state"].params
    assert fs_params["conv2"]["weight"].sharding.spec != PartitionSpec()
    assert dp["state"].params["conv2"]["weight"].sharding == NamedSharding(mesh, PartitionSpec())

    # per-replica BatchNorm (DDP's default) on a (4, 2) mesh: 4 replicas of 4 samples
    mesh42 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    ddp = run(
        module,
        copy(start),
        mesh42,
        train.DATA_PARALLEL,
        expected,
        None,
        "ddp",
        batch_norm="per_replica",
    )
    report["per_replica"] = {"vs_torch": ddp["vs_torch"]}
    accumulated = run(
        module,
        copy(start),
        mesh42,
        train.DATA_PARALLEL,
        expected,
        None,
        "ddp_accum",
        batch_norm="per_replica",
        micro_batches=2,
    )
    report["per_replica_accumulated"] = {"vs_torch": accumulated["vs_torch"]}
    print(json.dumps(report))
    print("SHARDED OK")


if __name__ == "__main__":
    main(sys.argv[1])
