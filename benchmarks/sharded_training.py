"""Training on a mesh: step time on 1 device against 8, and per-device memory, DDP vs FSDP.

The ResNet of `examples/train_resnet.py` (its SGD with parameter groups, its loss), one
process with 8 devices (simulated on CPU when there is no accelerator). Runs, interleaved:

- `1 device`: the state and the batch on device 0, no mesh: the baseline;
- `8 dev data-parallel`: `shard_train_state(..., DATA_PARALLEL)`, the batch split in 8;
- `8 dev fully sharded`: `shard_train_state(..., FULLY_SHARDED)` (parameters and SGD momentum
  split over the 8 devices);
- `8 dev DP per-replica BN`: data-parallel with DDP's per-replica BatchNorm statistics.

Printed per run: the median step time and its ratio to the baseline (interleaved repetitions,
so that load drifts hit every run alike), the largest per-device bytes of parameters +
optimizer state, XLA's per-device memory estimate of the compiled step (arguments + outputs +
temporaries - aliased donations), and the first-step loss (the same math everywhere).

Caveat: simulated CPU devices are threads of one process sharing this machine's cores (2 on
the development machine): 8 "devices" do not add compute, so the ratios measure the cost of
partitioning and collectives, not a speed-up. On real accelerators, run the same script.

    python benchmarks/sharded_training.py [--batch 64 --size 16 --width 16 --steps 10 --reps 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from train_resnet import ResNet, loss_fn, make_batch, make_optimizer

import flax_registry as fr
from flax_registry import train


def xla_bytes(step: Any, state: Any, batch: Any) -> int:
    """XLA's estimate of one device's memory for the compiled step."""
    analysis = step.lower(state, batch).compile().memory_analysis()
    if analysis is None:
        return -1
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="steps per repetition")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    assert jax.device_count() >= 8, "run with 8 devices (JAX_NUM_CPU_DEVICES=8 on CPU)"

    model = ResNet(width=args.width)
    tx, groups = make_optimizer(0.05, 1000)
    key = jax.random.key(0, impl="rbg")
    variables = jax.jit(lambda k: fr.init_variables(model, k))(key)
    images, labels = make_batch(0, args.batch, args.size, seed=0)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    device0 = jax.devices()[0]
    copy = lambda t: jax.tree.map(np.array, t)  # noqa: E731  (the steps donate their input)

    def new_state() -> train.TrainState:
        fresh = jax.random.key(0, impl="rbg")  # a new key each time: states are donated
        return train.create_train_state(model, copy(variables), tx, param_groups=groups, rng=fresh)

    configs: dict[str, tuple[Callable[[], Any], Any, Any]] = {
        "1 device": (
            lambda: jax.device_put(new_state(), device0),
            jax.device_put((images, labels), device0),
            train.make_train_step(loss_fn),
        ),
        "8 dev data-parallel": (
            lambda: train.shard_train_state(new_state(), mesh, train.DATA_PARALLEL),
            train.shard_batch((images, labels), mesh),
            train.make_train_step(loss_fn),
        ),
        "8 dev fully sharded": (
            lambda: train.shard_train_state(new_state(), mesh, train.FULLY_SHARDED),
            train.shard_batch((images, labels), mesh),
            train.make_train_step(loss_fn),
        ),
        "8 dev DP per-replica BN": (
            lambda: train.shard_train_state(new_state(), mesh, train.DATA_PARALLEL),
            train.shard_batch((images, labels), mesh),
            train.make_train_step(loss_fn, batch_norm="per_replica"),
        ),
    }
    states = {name: make() for name, (make, _, _) in configs.items()}
    memory, held, first = {}, {}, {}
    for name, (_, batch, step) in configs.items():
        memory[name] = xla_bytes(step, states[name], batch)
        per_device = train.bytes_per_device((states[name].params, states[name].opt_state))
        held[name] = max(per_device.values())
        states[name], metrics = step(states[name], batch)  # compiles
        first[name] = float(metrics["loss"])
    times: dict[str, list[float]] = {name: [] for name in configs}
    for rep in range(args.reps):
        order = list(configs) if rep % 2 == 0 else list(reversed(configs))
        for name in order:
            _, batch, step = configs[name]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                states[name], metrics = step(states[name], batch)
            jax.block_until_ready(metrics)
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["1 device"])
    total = sum(np.asarray(x).nbytes for x in jax.tree.leaves((new_state().params, new_state().opt_state)))  # fmt: skip
    print(
        f"\n{jax.device_count()} x {device0.device_kind}, ResNet width {args.width}, batch "
        f"{args.batch}x3x{args.size}x{args.size}, {args.reps} reps x {args.steps} steps, medians; "
        f"parameters + optimizer state {total / 1024:.1f} KiB in all"
    )
    print(
        "| run | ms/step | ratio to 1 device | params + opt state per device | XLA memory "
        "per device | first loss |"
    )
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"| {name} | {1e3 * med:.2f} | {med / base:.2f} | {held[name] / 1024:.1f} KiB "
            f"({held[name] / total:.1%}) | {memory[name] / 1024:.1f} KiB | {first[name]:.6f} |"
        )
    print(
        f"(simulated devices share {os.cpu_count()} CPU cores; load average "
        f"{os.getloadavg()[0]:.1f}: ratios show partitioning overhead, not a speed-up)"
    )


if __name__ == "__main__":
    main()
