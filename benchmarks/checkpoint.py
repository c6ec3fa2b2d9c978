"""Checkpoint save + restore: `flax_registry.checkpoint.CheckpointManager` vs plain orbax.

The same train state (an MLP with BatchNorm: parameters, running statistics, Adam moments) is
saved (and waited for) and restored again, interleaved, by

- `plain orbax`: `ocp.CheckpointManager` with `Composite(params, buffers, opt_state, meta)`
  items (`StandardSave` / `StandardRestore` into an abstract target, a small JSON item);
- `flax_registry`: `CheckpointManager.save(step, state)` and `restore(abstract_state)`, which add
  the key map, the non-persistent-buffer filter and the strictness checks.

The ratio of the medians should be about 1 (target <= 1.05).

    python benchmarks/checkpoint.py [--width 1024 --layers 6 --reps 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import flax_registry as fr
from flax_registry import nn, train
from flax_registry.checkpoint import CheckpointManager


class MLP(fr.Module):
    width: int = 1024
    layers: int = 6

    def setup(self) -> None:
        self.blocks = [nn.Linear(self.width, self.width) for _ in range(self.layers)]
        self.norms = [nn.BatchNorm1d(self.width) for _ in range(self.layers)]

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        for block, norm in zip(self.blocks, self.norms):
            x = jax.nn.relu(norm(block(x), train=train))
        return x


def plain_orbax(directory: Path, state: train.TrainState, abstract: train.TrainState) -> Any:
    """Save + restore the same items with orbax alone; returns (save_s, restore_s)."""
    with ocp.CheckpointManager(directory) as manager:
        t0 = time.perf_counter()
        manager.save(
            1,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                buffers=ocp.args.StandardSave(state.buffers),
                opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave({"step": int(state.step)}),
            ),
        )
        manager.wait_until_finished()
        t1 = time.perf_counter()
    with ocp.CheckpointManager(directory) as manager:
        t2 = time.perf_counter()
        restored = manager.restore(
            1,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                buffers=ocp.args.StandardRestore(abstract.buffers),
                opt_state=ocp.args.StandardRestore(abstract.opt_state),
                meta=ocp.args.JsonRestore(),
            ),
        )
        jax.block_until_ready((restored["params"], restored["opt_state"]))
        t3 = time.perf_counter()
    return t1 - t0, t3 - t2


def ours(directory: Path, module: MLP, state: train.TrainState, abstract: train.TrainState) -> Any:
    with CheckpointManager(directory, module) as manager:
        t0 = time.perf_counter()
        manager.save(1, state)
        manager.wait_until_finished()
        t1 = time.perf_counter()
    with CheckpointManager(directory, module) as manager:
        t2 = time.perf_counter()
        restored = manager.restore(abstract)
        jax.block_until_ready((restored.params, restored.opt_state))
        t3 = time.perf_counter()
    return t1 - t0, t3 - t2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--dir", type=Path, default=None, help="scratch directory (default: a temp dir)"
    )
    args = parser.parse_args()

    module = MLP(args.width, args.layers)
    variables = jax.jit(lambda k: fr.init_variables(module, k))(jax.random.key(0))
    tx = train.torch_adamw(1e-3)
    state = train.create_train_state(module, variables, tx)
    # one update, so that the moments are not all zeros
    grads = jax.tree.map(jnp.ones_like, state.params)
    state = state.apply_gradients(grads)
    abstract = train.create_train_state(module, fr.abstract_variables(module), tx)
    # both restore onto explicit shardings (the orbax docs' advice; without one orbax reads
    # the saved sharding from the checkpoint, which is slower)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    place = lambda t: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), t
    )
    abstract = abstract.replace(
        params=place(abstract.params),
        buffers=place(abstract.buffers),
        opt_state=place(abstract.opt_state),
    )
    nbytes = sum(
        np.asarray(x).nbytes
        for x in jax.tree.leaves((state.params, state.buffers, state.opt_state))
    )

    scratch = Path(args.dir or tempfile.mkdtemp(prefix="fr_ckpt_bench_"))
    results: dict[str, list[tuple[float, float]]] = {"plain orbax": [], "flax_registry": []}
    runs = {
        "plain orbax": lambda d: plain_orbax(d, state, abstract),
        "flax_registry": lambda d: ours(d, module, state, abstract),
    }
    try:
        for rep in range(args.reps + 1):  # the first round warms both up
            order = list(runs) if rep % 2 == 0 else list(reversed(runs))
            for name in order:
                directory = scratch / f"{name.replace(' ', '_')}_{rep}"
                timing = runs[name](directory)
                shutil.rmtree(directory)
                if rep:
                    results[name].append(timing)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"\n{nbytes / 2**20:.1f} MiB per step (params, buffers, Adam state; {args.layers} x "
        f"Linear({args.width}, {args.width}) + BatchNorm1d), {args.reps} reps, medians, disk {scratch.parent}"
    )
    print("| | save+wait s | restore s | total s | ratio (total) |")
    print("|---|---|---|---|---|")
    base = statistics.median(s + r for s, r in results["plain orbax"])
    for name, timings in results.items():
        save = statistics.median(s for s, _ in timings)
        restore = statistics.median(r for _, r in timings)
        total = statistics.median(s + r for s, r in timings)
        print(f"| {name} | {save:.3f} | {restore:.3f} | {total:.3f} | {total / base:.3f} |")
    print(f"(load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
