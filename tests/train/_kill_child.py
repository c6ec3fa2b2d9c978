"""Child process of the kill-during-save test: saves step 1, starts an async save of a big
step 2, says so on stdout, and waits to be killed."""

import sys
import time

import jax.numpy as jnp

import flax_registry as fr
from flax_registry.checkpoint import CheckpointManager


class Big(fr.Module):
    n: int = 16
    size: int = 1 << 20

    def setup(self) -> None:
        for i in range(self.n):
            self.register_parameter(f"w{i}", fr.Parameter(jnp.zeros(self.size)))
        self.register_buffer("count", jnp.zeros((), jnp.int32))


def variables(module: Big, value: float) -> dict:
    params = {f"w{i}": jnp.full(module.size, value + i, jnp.float32) for i in range(module.n)}
    return {"params": params, "buffers": {"count": jnp.asarray(int(value), jnp.int32)}}


if __name__ == "__main__":
    directory = sys.argv[1]
    module = Big()
    manager = CheckpointManager(directory, module)
    manager.save(1, variables(module, 1.0))
    manager.wait_until_finished()
    start = time.perf_counter()
    manager.save(2, variables(module, 2.0))
    print(f"SAVING {time.perf_counter() - start:.3f}", flush=True)
    time.sleep(120)
