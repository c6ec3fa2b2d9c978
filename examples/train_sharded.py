"""Train the ResNet of `train_resnet.py` on a device mesh: data-parallel, then fully sharded.

    python examples/train_sharded.py                      # 8 simulated CPU devices
    python examples/train_sharded.py --batch-norm per_replica --micro-batches 2
    python examples/train_sharded.py --precision bf16

On a cluster, start the same script once per host (every process runs the same program):

    python examples/train_sharded.py --coordinator HOST0:1234 --num-processes N --process-id I

(on TPU pods and SLURM / Open MPI clusters `--coordinator auto` lets `jax.distributed` find
all three by itself). The mesh then spans every device of every process, each process feeds
its own part of the batch (`shard_batch(..., local=True)`) and holds only its own shards.

What it shows:
- `train.shard_train_state(state, mesh, DATA_PARALLEL | FULLY_SHARDED)`: PyTorch's DDP
  (everything replicated, the batch split) and FSDP / ZeRO-3 (parameters and optimizer state
  split over the `data` axis), chosen with one argument and named by PyTorch names;
- `train.shard_batch`: the batch split over the `data` axis;
- `train.make_train_step` keeping every array where it was placed (the script checks it), with
  BatchNorm statistics over the global batch (`SyncBatchNorm`, the default) or per replica
  (DDP's default), gradient accumulation and mixed precision;
- both placements compute the same numbers: the script prints the largest difference of
  their losses, and how many bytes of parameters and optimizer state each device holds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")  # simulated devices when there is no accelerator

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_resnet import ResNet, loss_fn, make_batch, make_optimizer

import flax_registry as fr
from flax_registry import train

PRECISION = {"fp32": None, "bf16": train.Policy(compute_dtype=jnp.bfloat16)}


def per_device(tree: Any) -> tuple[int, int]:
    """The most bytes of `tree` any device holds, and the bytes of the whole tree."""
    held = train.bytes_per_device(tree)
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return max(held.values()), total


def run(strategy: str, args: argparse.Namespace, mesh: Any) -> list[float]:
    model = ResNet(width=args.width)
    tx, groups = make_optimizer(args.lr, args.steps)
    create = lambda k: train.create_train_state(  # noqa: E731
        model, fr.init_variables(model, k), tx, param_groups=groups, rng=k
    )
    # Create the state directly in its shards: jit with the placement as out_shardings.
    abstract = jax.eval_shape(create, jax.random.key(args.seed))
    placement = train.train_state_shardings(abstract, mesh, strategy)
    state = jax.jit(create, out_shardings=placement)(jax.random.key(args.seed))
    step = train.make_train_step(
        loss_fn,
        batch_norm=args.batch_norm,
        micro_batches=args.micro_batches,
        policy=PRECISION[args.precision],
    )
    per_process = args.batch_size // jax.process_count()
    losses = []
    for index in range(args.steps):
        images, labels = make_batch(index, args.batch_size, args.image_size, seed=args.seed)
        rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
        batch = train.shard_batch((images[rows], labels[rows]), mesh, local=True)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    moved = [
        jax.tree_util.keystr(path)
        for (path, leaf), wanted in zip(
            jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(placement)
        )
        if leaf.sharding != wanted
    ]
    assert not moved, f"arrays left their placement: {moved}"
    params, params_total = per_device(state.params)
    both, both_total = per_device((state.params, state.opt_state))
    conv = state.params["layer2"]["conv2"]["weight"]
    print(
        f"{strategy}: loss {losses[0]:.4f} -> {losses[-1]:.4f}\n"
        f"  per device: parameters {params / 1024:.1f} of {params_total / 1024:.1f} KiB "
        f"({params / params_total:.1%}), with optimizer state {both / 1024:.1f} of "
        f"{both_total / 1024:.1f} KiB ({both / both_total:.1%}); layer2.conv2.weight "
        f"{conv.shape} placed as {conv.sharding.spec}"
    )
    return losses


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-norm", choices=["global", "per_replica"], default="global")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--precision", choices=sorted(PRECISION), default="fp32")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0, or 'auto'")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args(argv)
    if args.coordinator == "auto":
        jax.distributed.initialize()
    elif args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    print(
        f"{jax.device_count()} devices ({jax.devices()[0].platform}) in {jax.process_count()} "
        f"process(es); batch {args.batch_size}, BatchNorm statistics {args.batch_norm}, "
        f"{args.micro_batches} micro-batch(es), {args.precision}"
    )
    losses = {s: run(s, args, mesh) for s in (train.DATA_PARALLEL, train.FULLY_SHARDED)}
    gap = max(abs(a - b) for a, b in zip(*losses.values()))
    print(f"largest loss difference, data-parallel vs fully sharded: {gap:.2e}")
    return losses


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - t0:.1f}s")
