"""Run in a fresh process: `python _resume_child.py DIR first|second`.

first: 3 training steps of an NNX model, a checkpoint, 2 more steps; writes the states.
second: restores into an abstract model (`flax_registry.nnx.eval_shape`), checks the restored
state against what was saved, trains 2 steps and writes the result.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flax_registry as fr
from flax_registry.nnx import nn as nnx_nn


class Net(fr.nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.body = nnx_nn.Sequential(
            nnx_nn.Linear(6, 16, rngs=rngs), nnx_nn.BatchNorm1d(16, rngs=rngs), nnx_nn.ReLU()
        )
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)
        self.register_buffer("seen", jnp.zeros((), jnp.int32))
        self.register_buffer("table", jnp.arange(3.0), persistent=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.drop(self.body(x))) + self.table


def loss_fn(model: object, batch: dict[str, jax.Array]) -> jax.Array:
    logits = model(batch["x"])  # type: ignore[operator]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def batch(i: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(i)
    return {
        "x": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, 3, 8)),
    }


def flat(state: fr.TrainState) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path((state.params, state.buffers, state.opt_state))
    out = {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}
    out["step"] = np.asarray(state.step)
    return out


def main() -> None:
    directory, phase = Path(sys.argv[1]), sys.argv[2]
    tx = fr.train.torch_adamw(1e-2)
    step = fr.make_train_step(loss_fn)
    if phase == "first":
        state = fr.create_train_state(Net(nnx.Rngs(0)), tx, rng=jax.random.key(1))
        for i in range(3):
            state, _ = step(state, batch(i))
        with fr.CheckpointManager(directory / "ckpt", state.module) as manager:
            manager.save(3, state)
        np.savez(directory / "saved.npz", **flat(state))
        for i in range(3, 5):
            state, _ = step(state, batch(i))
        np.savez(directory / "uninterrupted.npz", **flat(state))
    else:
        abstract = fr.nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
        target = fr.create_train_state(abstract, tx, rng=jax.random.key(1))
        with fr.CheckpointManager(directory / "ckpt", abstract) as manager:
            state = manager.restore(target)
        np.savez(directory / "restored.npz", **flat(state))
        for i in range(3, 5):
            state, _ = step(state, batch(i))
        np.savez(directory / "resumed.npz", **flat(state))
    print("OK")


if __name__ == "__main__":
    main()
