"""Train-step overhead: `flax_registry.train.make_train_step` vs a hand-written flax.linen + optax step.

Three jitted steps on the same small ResNet (BatchNorm, NCHW, same variable tree, same optax
transformation, same inputs), run interleaved in one process:

- `linen+optax (hand)`: a plain `flax.linen` model (its running statistics in `batch_stats`,
  threaded by hand with `mutable=['batch_stats']`) and a hand-written step;
- `fr model, hand step`: the `flax_registry.nn` model with the same hand-written step, so the
  model code's cost is separated from the training machinery's;
- `fr train step`: `create_train_state` + `make_train_step` on the `flax_registry.nn` model.

All three compute the same math; the script checks that their first-step losses agree. The
ratios should be 1.00 within noise (target <= 1.03).

    python benchmarks/train_step.py [--batch 64 --size 32 --width 32 --steps 20 --reps 7]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flax_registry as fr
from flax_registry import nn, train

# --- the model, twice ------------------------------------------------------------------------


class Block(fr.Module):
    c_in: int
    c_out: int
    stride: int = 1

    def setup(self) -> None:
        self.conv1 = nn.Conv2d(self.c_in, self.c_out, 3, stride=self.stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.c_out)
        self.conv2 = nn.Conv2d(self.c_out, self.c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(self.c_out)
        if self.stride != 1 or self.c_in != self.c_out:
            self.downsample = nn.Sequential(  # mypy reads the dataclass fields
                nn.Conv2d(self.c_in, self.c_out, 1, stride=self.stride, bias=False),
                nn.BatchNorm2d(self.c_out),
            )

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        out = self.bn2(self.conv2(out), train=train)
        shortcut = self.downsample(x, train=train) if hasattr(self, "downsample") else x
        return jax.nn.relu(out + shortcut)


class Net(fr.Module):
    width: int = 32

    def setup(self) -> None:
        w = self.width
        self.conv1 = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = Block(w, w)
        self.layer2 = Block(w, 2 * w, stride=2)
        self.fc = nn.Linear(2 * w, 10)

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        x = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        x = self.layer2(self.layer1(x, train=train), train=train)
        return self.fc(x.mean(axis=(2, 3)))


class LConv(linen.Module):
    c_in: int
    c_out: int
    k: int
    stride: int = 1

    @linen.compact
    def __call__(self, x: Any) -> Any:
        w = self.param(
            "weight", linen.initializers.lecun_normal(), (self.c_out, self.c_in, self.k, self.k)
        )
        p = self.k // 2
        return jax.lax.conv_general_dilated(
            x, w, (self.stride,) * 2, [(p, p)] * 2, dimension_numbers=("NCHW", "OIHW", "NCHW")
        )


class LBatchNorm(linen.Module):
    c: int

    @linen.compact
    def __call__(self, x: Any, train: bool) -> Any:
        weight = self.param("weight", linen.initializers.ones, (self.c,))
        bias = self.param("bias", linen.initializers.zeros, (self.c,))
        mean_v = self.variable("batch_stats", "running_mean", jnp.zeros, (self.c,))
        var_v = self.variable("batch_stats", "running_var", jnp.ones, (self.c,))
        count = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
        shape = (1, -1, 1, 1)
        if train:
            mean = jnp.mean(x, axis=(0, 2, 3), keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=(0, 2, 3), keepdims=True)
            n = x.size / x.shape[1]
            if not self.is_initializing():
                mean_v.value = 0.9 * mean_v.value + 0.1 * mean.reshape(-1)
                var_v.value = 0.9 * var_v.value + 0.1 * var.reshape(-1) * n / (n - 1)
                count.value = count.value + 1
        else:
            mean, var = mean_v.value.reshape(shape), var_v.value.reshape(shape)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5)
        return y * weight.reshape(shape) + bias.reshape(shape)


class LDownsample(linen.Module):
    c_in: int
    c_out: int
    stride: int

    @linen.compact
    def __call__(self, x: Any, train: bool) -> Any:
        x = LConv(self.c_in, self.c_out, 1, self.stride, name="layers_0")(x)
        return LBatchNorm(self.c_out, name="layers_1")(x, train)


class LBlock(linen.Module):
    c_in: int
    c_out: int
    stride: int = 1

    @linen.compact
    def __call__(self, x: Any, train: bool) -> Any:
        out = LConv(self.c_in, self.c_out, 3, self.stride, name="conv1")(x)
        out = jax.nn.relu(LBatchNorm(self.c_out, name="bn1")(out, train))
        out = LBatchNorm(self.c_out, name="bn2")(
            LConv(self.c_out, self.c_out, 3, name="conv2")(out), train
        )
        if self.stride != 1 or self.c_in != self.c_out:
            x = LDownsample(self.c_in, self.c_out, self.stride, name="downsample")(x, train)
        return jax.nn.relu(out + x)


# --- steps -------------------------------------------------------------------------------------


def cross_entropy(logits: Any, labels: Any) -> Any:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def hand_step(apply: Callable[..., Any], collection: str, tx: optax.GradientTransformation) -> Any:
    """The hand-written step: value_and_grad over params, buffers threaded by hand."""

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params: Any, stats: Any, opt_state: Any, x: Any, y: Any) -> Any:
        def loss_fn(p: Any) -> Any:
            logits, updates = apply(
                {"params": p, collection: stats}, x, train=True, mutable=[collection]
            )
            return cross_entropy(logits, y), (updates[collection], (logits.argmax(-1) == y).mean())

        (loss, (stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (
            optax.apply_updates(params, updates),
            stats,
            opt_state,
            {"loss": loss, "accuracy": acc},
        )

    return step


def fr_loss(model: Any, batch: Any) -> Any:
    x, y = batch
    logits = model(x)
    return cross_entropy(logits, y), {"accuracy": (logits.argmax(-1) == y).mean()}


class LNet(linen.Module):
    """Net in plain flax.linen, with the same variable tree (statistics in `batch_stats`)."""

    width: int = 32

    @linen.compact
    def __call__(self, x: Any, train: bool = False) -> Any:
        w = self.width
        x = jax.nn.relu(LBatchNorm(w, name="bn1")(LConv(3, w, 3, name="conv1")(x), train))
        x = LBlock(w, w, name="layer1")(x, train)
        x = LBlock(w, 2 * w, 2, name="layer2")(x, train)
        return LLinear(2 * w, 10, name="fc")(x.mean(axis=(2, 3)))


class LLinear(linen.Module):
    c_in: int
    c_out: int

    @linen.compact
    def __call__(self, x: Any) -> Any:
        w = self.param("weight", linen.initializers.lecun_normal(), (self.c_out, self.c_in))
        b = self.param("bias", linen.initializers.zeros, (self.c_out,))
        return x @ w.T + b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="steps per repetition")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()

    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9, nesterov=True))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, 3, args.size, args.size)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)

    model = Net(args.width)
    variables = jax.jit(lambda k: fr.init_variables(model, k))(jax.random.key(0))
    lmodel = LNet(args.width)
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731  (donation consumes its inputs)
    # the same numbers everywhere: the linen tree mirrors the registry tree
    lvars = {"params": copy(variables["params"]), "batch_stats": copy(variables["buffers"])}
    linen_tree = jax.tree.structure(lmodel.init(jax.random.key(0), x)["params"])
    assert linen_tree == jax.tree.structure(variables["params"])  # type: ignore[operator]

    linen_step = hand_step(lmodel.apply, "batch_stats", tx)
    fr_hand_step = hand_step(model.apply, "buffers", tx)
    fr_step = train.make_train_step(fr_loss)
    state0 = train.create_train_state(model, variables, tx)
    params0 = variables["params"]
    compiled = {  # what XLA runs: the cost model's flops and bytes, free of timing noise
        "linen+optax (hand)": linen_step.lower(
            lvars["params"], lvars["batch_stats"], tx.init(params0), x, y
        ),
        "fr model, hand step": fr_hand_step.lower(
            params0, variables["buffers"], tx.init(params0), x, y
        ),
        "fr train step": fr_step.lower(state0, (x, y)),  # type: ignore[attr-defined]
    }
    costs = {}
    for name, lowered in compiled.items():
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        costs[name] = (cost.get("flops", float("nan")), cost.get("bytes accessed", float("nan")))

    def linen_runner() -> Callable[[], Any]:
        s = [lvars["params"], lvars["batch_stats"], tx.init(lvars["params"])]

        def run() -> Any:
            s[0], s[1], s[2], m = linen_step(s[0], s[1], s[2], x, y)
            return m

        return run

    def fr_hand_runner() -> Callable[[], Any]:
        params = copy(variables["params"])
        s = [params, copy(variables["buffers"]), tx.init(params)]

        def run() -> Any:
            s[0], s[1], s[2], m = fr_hand_step(s[0], s[1], s[2], x, y)
            return m

        return run

    def fr_runner() -> Callable[[], Any]:
        holder = [train.create_train_state(model, copy(variables), tx)]

        def run() -> Any:
            holder[0], m = fr_step(holder[0], (x, y))
            return m

        return run

    runners = {
        "linen+optax (hand)": linen_runner(),
        "fr model, hand step": fr_hand_runner(),
        "fr train step": fr_runner(),
    }
    first = {name: float(run()["loss"]) for name, run in runners.items()}  # compiles
    spread = max(first.values()) - min(first.values())
    print(f"first-step losses {first} (spread {spread:.1e}: same math)")
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(2):  # warm-up
        for run in runners.values():
            jax.block_until_ready(run())
    for rep in range(args.reps):
        order = list(runners) if rep % 2 == 0 else list(reversed(runners))
        for name in order:
            run = runners[name]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                m = run()
            jax.block_until_ready(m)
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["linen+optax (hand)"])
    print(
        f"\n{jax.devices()[0].device_kind}, batch {args.batch}x3x{args.size}x{args.size}, "
        f"width {args.width}, {args.reps} reps x {args.steps} steps, medians"
    )
    base_min = min(times["linen+optax (hand)"])
    print(
        "| step | median ms/step | ratio (median) | min ms/step | ratio (min) "
        "| XLA flops | XLA bytes accessed |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        med, low = statistics.median(ts), min(ts)
        flops, nbytes = costs[name]
        print(
            f"| {name} | {1e3 * med:.2f} | {med / base:.3f} | {1e3 * low:.2f} | "
            f"{low / base_min:.3f} | {flops:.4g} | {nbytes:.4g} |"
        )
    print(f"(load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
