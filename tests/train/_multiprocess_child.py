"""One process of the two-process training test (2 CPU devices each, one 4-device mesh over
both; `jax.distributed` on a loopback coordinator).

    python -m tests.train._multiprocess_child PHASE PROCESS_ID PORT WORKDIR

- `first`: convert WORKDIR/init.safetensors with `from_torch(shardings=...)` (each process
  reading only its own devices' slices), fully shard the train state, 3 steps, save step 3
  with `CheckpointManager` (every process takes part);
- `second`: a fresh run restores step 3 onto the mesh, 2 more steps, and process 0 writes
  the final parameters, buffers and Adam moments (gathered from both processes) to
  WORKDIR/final.npz;
- `die`: process 1 exits right after joining, process 0 waits in a collective for it: the
  parent must notice and stop both rather than hang.
"""

from __future__ import annotations

import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax

PROCESSES = 2


def main(phase: str, process_id: int, port: int, workdir: str) -> None:
    jax.distributed.initialize(
        f"localhost:{port}", PROCESSES, process_id, initialization_timeout=60
    )
    # the restarted run reuses the first run's compiled step, as a restarted job would
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from jax.experimental import multihost_utils

    assert jax.process_count() == PROCESSES and jax.local_device_count() == 2
    if phase == "die":
        if process_id == 1:
            os._exit(3)
        multihost_utils.sync_global_devices("never reached by process 1")
        return
    import numpy as np

    import flax_registry as fr
    from flax_registry import train
    from flax_registry.checkpoint import CheckpointManager
    from flax_registry.convert._source import Source

    from .nets import Net, batches, cross_entropy

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    module = Net(channels=8, classes=4)
    tx = train.torch_adamw(1e-2, weight_decay=0.1)
    abstract = train.create_train_state(module, fr.abstract_variables(module), tx)
    placement = train.train_state_shardings(abstract, mesh, train.FULLY_SHARDED)
    data = [train.shard_batch(b, mesh) for b in batches(5, batch=8, seed=1)]
    step = train.make_train_step(cross_entropy)
    directory = os.path.join(workdir, "ckpt")
    if phase == "first":
        read: dict[str, int] = {}
        original = Source.read_slice

        def counting(self: Source, key: str, index: tuple[slice, ...]) -> np.ndarray:
            out = original(self, key, index)
            read[key] = read.get(key, 0) + out.size
            return out

        Source.read_slice = counting  # type: ignore[method-assign]
        variables, report = fr.from_torch(
            module, os.path.join(workdir, "init.safetensors"), shardings=placement.variables
        )
        Source.read_slice = original  # type: ignore[method-assign]
        assert report.ok, report
        # conv2.weight is split in 4 over the two processes: each reads its half only
        assert read["conv2.weight"] == 8 * 8 * 3 * 3 // 2, read
        state = train.create_train_state(module, variables, tx)
        state = train.shard_train_state(state, mesh, train.FULLY_SHARDED)
        for batch in data[:3]:
            state, _ = step(state, batch)
        with CheckpointManager(directory, module) as manager:
            manager.save(3, state)
        print("FIRST OK", flush=True)
        return
    target = train.shard_train_state(abstract, mesh, train.FULLY_SHARDED)
    with CheckpointManager(directory, module) as manager:
        state = manager.restore(target)
    assert int(state.step) == 3
    for batch in data[3:]:
        state, _ = step(state, batch)
        weight = state.params["conv2"]["weight"]
        assert weight.sharding == placement.params["conv2"]["weight"], weight.sharding
        assert not weight.is_fully_addressable  # each process holds its own shards only
    inner = state.opt_state.inner_states["default"].inner_state
    gathered = multihost_utils.process_allgather(
        {"variables": state.variables, "exp_avg": inner.exp_avg, "exp_avg_sq": inner.exp_avg_sq},
        tiled=True,
    )
    if process_id == 0:
        out = {f"param/{k}": v for k, v in fr.named_parameters(module, gathered["variables"])}
        out.update({f"buffer/{k}": v for k, v in fr.named_buffers(module, gathered["variables"])})
        for field in ("exp_avg", "exp_avg_sq"):
            moments = {**gathered["variables"], "params": gathered[field]}
            out.update({f"{field}/{k}": v for k, v in fr.named_parameters(module, moments)})
        out["step"] = np.asarray(int(state.step))
        np.savez(os.path.join(workdir, "final.npz"), **{k: np.asarray(v) for k, v in out.items()})
    print("SECOND OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
