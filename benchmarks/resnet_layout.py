"""ResNet layout cost: the torch-layout port (flax_registry.nn, NCHW activations, OIHW kernels)
against the same network in plain `flax.linen` (nn.Conv / nn.BatchNorm / nn.Dense, NHWC, HWIO).

Both models are ResNet-18 (BasicBlock x (2, 2, 2, 2), widths 64..512 by default, 7x7 stem,
max pool, global average pool, linear head) with the same math: two-pass BatchNorm statistics
(`use_fast_variance=False`), eps 1e-5, the same padding. They are built in the same process,
the port's weights are copied into the plain model and the outputs compared (so the timings
compare the same computation), then each step is compiled once and timed:

- `forward`: eval mode (running statistics), `model.apply(variables, x)`;
- `fwd+bwd`: train mode (batch statistics, running statistics updated), the gradient of a
  scalar loss w.r.t. the parameters.

Runs alternate between the models (port, plain, port, ...) so that both see the same machine
load; the table reports medians, the ratio port / plain, and the megabytes written by the
copy / transpose ops of each compiled program (XLA's layout changes).

What it shows on XLA:CPU: the layout costs (almost) nothing. XLA canonicalises every
convolution to NHWC / HWIO whatever the dimension numbers say, and its layout assignment
gives the NCHW activations between the convolutions an NHWC physical layout, so the
BatchNorm and ReLU around them need no activation transposes; what remains is one OIHW ->
HWIO copy of each kernel per step (~45 MB for ResNet-18, a few ms), plus, in the backward
pass, BatchNorm residuals stored channels-first. See the last line of the output.

    python benchmarks/resnet_layout.py                       # batch 16, 32x32, widths 64..512
    python benchmarks/resnet_layout.py --size 64 --reps 10   # 4x the pixels
    python benchmarks/resnet_layout.py --batch 4 --widths 16,32,64,128 --reps 5   # quick
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import flax_registry as fr
from flax_registry import nn as frnn

Array = jax.Array

# --- the port: torch names and layouts --------------------------------------------------------


class BasicBlock(fr.Module):
    inplanes: int
    planes: int
    stride: int = 1

    def setup(self) -> None:
        self.conv1 = frnn.Conv2d(self.inplanes, self.planes, 3, self.stride, 1, bias=False)
        self.bn1 = frnn.BatchNorm2d(self.planes)
        self.conv2 = frnn.Conv2d(self.planes, self.planes, 3, 1, 1, bias=False)
        self.bn2 = frnn.BatchNorm2d(self.planes)
        if self.stride != 1 or self.inplanes != self.planes:
            self.downsample = frnn.Sequential(
                layers=(
                    frnn.Conv2d(self.inplanes, self.planes, 1, self.stride, bias=False),
                    frnn.BatchNorm2d(self.planes),
                )
            )

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        out = self.bn2(self.conv2(out), train=train)
        identity = x
        if self.stride != 1 or self.inplanes != self.planes:
            identity = self.downsample(x, train=train)
        return jax.nn.relu(out + identity)


class PortResNet(fr.Module):
    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    num_classes: int

    def setup(self) -> None:
        w = self.widths
        self.conv1 = frnn.Conv2d(3, w[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = frnn.BatchNorm2d(w[0])
        self.maxpool = frnn.MaxPool2d(3, 2, 1)
        stages, inplanes = [], w[0]
        for i, (planes, n) in enumerate(zip(w, self.blocks)):
            stride = 1 if i == 0 else 2
            layer = [BasicBlock(inplanes, planes, stride)]
            layer += [BasicBlock(planes, planes) for _ in range(1, n)]
            stages.append(frnn.Sequential(layers=layer))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = frnn.Linear(w[-1], self.num_classes)

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        x = self.maxpool(jax.nn.relu(self.bn1(self.conv1(x), train=train)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x, train=train)
        return self.fc(jnp.mean(x, axis=(2, 3)))


# --- plain flax: NHWC, HWIO -------------------------------------------------------------------


def _bn(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        use_fast_variance=False,
        name=name,
    )


class FlaxBlock(nn.Module):
    inplanes: int
    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        s, p = (self.stride, self.stride), ((1, 1), (1, 1))
        out = nn.Conv(self.planes, (3, 3), s, padding=p, use_bias=False, name="conv1")(x)
        out = nn.relu(_bn(train, "bn1")(out))
        out = nn.Conv(self.planes, (3, 3), padding=p, use_bias=False, name="conv2")(out)
        out = _bn(train, "bn2")(out)
        identity = x
        if self.stride != 1 or self.inplanes != self.planes:
            identity = nn.Conv(self.planes, (1, 1), s, use_bias=False, name="down_conv")(x)
            identity = _bn(train, "down_bn")(identity)
        return nn.relu(out + identity)


class FlaxResNet(nn.Module):
    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    num_classes: int

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        w = self.widths
        x = nn.Conv(w[0], (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, name="conv1")(x)
        x = nn.relu(_bn(train, "bn1")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        inplanes = w[0]
        for i, (planes, n) in enumerate(zip(w, self.blocks)):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                x = FlaxBlock(inplanes, planes, stride, name=f"layer{i + 1}_{j}")(x, train)
                inplanes = planes
        return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))


# --- weights: port -> plain flax --------------------------------------------------------------


def _flax_key(torch_key: str) -> tuple[str, ...]:
    """`layer2.0.downsample.1.running_mean` -> ('layer2_0', 'down_bn', 'mean')."""
    parts = torch_key.split(".")
    if parts[0].startswith("layer"):
        parts = [f"{parts[0]}_{parts[1]}", *parts[2:]]
    if "downsample" in parts:
        i = parts.index("downsample")
        parts[i : i + 2] = ["down_conv" if parts[i + 1] == "0" else "down_bn"]
    renames = {"running_mean": "mean", "running_var": "var"}
    return (*parts[:-1], renames.get(parts[-1], parts[-1]))


def port_to_flax(port_sd: dict[str, Any], plain_vars: Any) -> Any:
    """The plain model's variables holding the port's state_dict (weights transposed)."""
    params = jax.tree.map(np.asarray, plain_vars["params"])
    stats = jax.tree.map(np.asarray, plain_vars["batch_stats"])
    for key, value in port_sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        *path, leaf = _flax_key(key)
        value = np.asarray(value)
        is_bn = any(p.startswith("bn") or p == "down_bn" for p in path)
        tree = stats if leaf in ("mean", "var") else params
        node = tree
        for part in path:
            node = node[part]
        if leaf == "weight":
            if value.ndim == 4:
                leaf, value = "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            elif is_bn:
                leaf = "scale"
            else:
                leaf, value = "kernel", value.T  # Linear (out, in) -> Dense (in, out)
        assert node[leaf].shape == value.shape, (key, node[leaf].shape, value.shape)
        node[leaf] = value
    return {"params": params, "batch_stats": stats}


# --- timing -----------------------------------------------------------------------------------


def compiled(model: Any, variables: Any, x: Any, train: bool, plain: bool) -> Any:
    """The compiled step on `x`: eval forward, or train-mode value-and-grad w.r.t. the params
    (plus the updated buffers / batch_stats; not the params, which flax's `mutable=` leaves
    out too)."""
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    if not train:
        return jax.jit(model.apply).lower(variables, x).compile(), (variables, x)

    def loss(p: Any, rest: Any, x: Any) -> Any:
        v = {**rest, "params": p}
        if plain:
            out, new = model.apply(v, x, train=True, mutable=["batch_stats"])
        else:
            out, new = fr.apply(model, v, x, train=True)
            new = {k: c for k, c in new.items() if k != "params"}
        return jnp.mean(out**2), new

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return step.lower(params, rest, x).compile(), (params, rest, x)


def copy_megabytes(executable: Any) -> float:
    """MB written by the copy / transpose ops of the compiled program (layout changes)."""
    text = executable.as_text()
    entry = text[text.index("ENTRY") :]
    total = 0
    for line in entry.splitlines():
        name = line.split("=")[0]
        if "copy" in name or "transpose" in name:
            match = re.search(r"= (f32|s32|pred)\[([\d,]*)\]", line)
            if match:
                size = 1 if match.group(1) == "pred" else 4
                total += size * math.prod(int(d) for d in match.group(2).split(",") if d)
    return total / 1e6


def time_alternating(
    steps: dict[str, tuple[Any, tuple[Any, ...]]], reps: int, warmup: int
) -> dict[str, float]:
    """Median seconds per call of each compiled step, the steps called in alternation."""
    for executable, args in steps.values():
        for _ in range(warmup):
            jax.block_until_ready(executable(*args))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, (executable, args) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(executable(*args))
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def kernel_transpose_ms(kernels: list[Any], reps: int) -> float:
    """Median ms to transpose every conv kernel OIHW -> HWIO once (what the port adds)."""
    transpose = jax.jit(lambda ks: [jnp.transpose(k, (2, 3, 1, 0)) for k in ks])
    jax.block_until_ready(transpose(kernels))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(transpose(kernels))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="input height = width")
    parser.add_argument("--widths", type=_ints, default=(64, 128, 256, 512))
    parser.add_argument("--blocks", type=_ints, default=(2, 2, 2, 2))
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    port = PortResNet(args.widths, args.blocks, args.classes)
    plain = FlaxResNet(args.widths, args.blocks, args.classes)
    rng = np.random.default_rng(0)
    x_nchw = jnp.asarray(rng.standard_normal((args.batch, 3, args.size, args.size)), jnp.float32)
    x_nhwc = jnp.transpose(x_nchw, (0, 2, 3, 1))
    port_vars = fr.init_variables(port, jax.random.key(0))
    port_sd = fr.state_dict(port, port_vars)
    plain_vars = port_to_flax(port_sd, plain.init(jax.random.key(1), x_nhwc[:1]))

    theirs: Any = plain.apply(plain_vars, x_nhwc)
    ours: Any = port.apply(port_vars, x_nchw)
    diff = float(jnp.max(jnp.abs(ours - theirs)))
    print(
        f"ResNet blocks={args.blocks} widths={args.widths} batch={args.batch} "
        f"input={args.size}x{args.size}, {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"{args.reps} timed runs (medians); same weights, max |port - plain| = {diff:.1e}"
    )
    assert diff < 1e-4 * max(1.0, float(jnp.max(jnp.abs(theirs)))), "the two models differ"

    header = f"{'':<9}{'port NCHW':>11}{'plain NHWC':>12}{'port/plain':>12}"
    print(f"\n{header}{'copy MB port':>14}{'copy MB plain':>15}")
    for label, train in (("forward", False), ("fwd+bwd", True)):
        steps = {
            "port": compiled(port, port_vars, x_nchw, train, plain=False),
            "plain": compiled(plain, plain_vars, x_nhwc, train, plain=True),
        }
        t = time_alternating(steps, args.reps, args.warmup)
        mb = {name: copy_megabytes(executable) for name, (executable, _) in steps.items()}
        print(
            f"{label:<9}{t['port'] * 1e3:>9.1f}ms{t['plain'] * 1e3:>10.1f}ms"
            f"{t['port'] / t['plain']:>12.3f}{mb['port']:>14.1f}{mb['plain']:>15.1f}"
        )
    kernels = [v for v in port_sd.values() if v.ndim == 4]
    megabytes = sum(k.size * k.dtype.itemsize for k in kernels) / 1e6
    print(
        f"\ncopy MB: bytes written by the copy/transpose ops of the compiled step. Transposing "
        f"all {len(kernels)} conv kernels OIHW -> HWIO once ({megabytes:.1f} MB) takes "
        f"{kernel_transpose_ms(kernels, args.reps):.1f} ms here."
    )


if __name__ == "__main__":
    main()
