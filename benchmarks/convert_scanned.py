"""Scanned-layer conversion: peak memory and wall time of `from_torch` into an `nn.scan` decoder.

Builds a Llama-style checkpoint (`layers.{i}.self_attn.q_proj.weight`, ...; grouped-query
heads, gate/up/down MLP) as a sharded safetensors directory in a temp dir, then measures, each
in a fresh subprocess (peak RSS: Linux VmHWM, reset after imports; `extra` = peak minus the RSS
before the conversion):

- `flax_registry`: `from_torch` with rules only (`Scanned`, `Stacked`, `einsum_layout`) into a
  decoder whose `nn.scan` keeps every variable as one `(L, ...)` array, einsum-shaped kernels
  and stacked k/v and gate/up;
- `naive`: what a hand-written converter does: every shard loaded (`safetensors.numpy.
  load_file`), one reshape/transpose per key, `np.stack` over the layers, `jnp.asarray`;
- `floor`: the files' bytes read once into one preallocated buffer.

Targets: `extra` <= output + one layer for `flax_registry` (the naive way holds the whole
checkpoint and the stacked copy at once, ~3x the output), and faster than the naive way. The
last column is how many layers beyond the output the conversion held at its peak.

    python benchmarks/convert_scanned.py               # 24 layers, hidden 1024 (~1.4 GB)
    python benchmarks/convert_scanned.py --size small  # 24 layers, hidden 256 (~94 MB)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = {
    "full": dict(layers=24, hidden=1024, inter=4096, heads=16, kv_heads=8, head_dim=64, vocab=512),
    "small": dict(layers=24, hidden=256, inter=1024, heads=8, kv_heads=4, head_dim=32, vocab=64),
}


def torch_shapes(c: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The Hugging Face Llama state_dict keys and shapes (torch layout)."""
    d, f, n, k, h = c["hidden"], c["inter"], c["heads"], c["kv_heads"], c["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (c["vocab"], d)}
    for i in range(c["layers"]):
        p = f"layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (n * h, d)
        shapes[p + "self_attn.k_proj.weight"] = (k * h, d)
        shapes[p + "self_attn.v_proj.weight"] = (k * h, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, n * h)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes["norm.weight"] = (d,)
    return shapes


def scanned_model(c: dict[str, int]) -> tuple[Any, Any]:
    """The flax decoder (one `nn.scan` over a block of raw einsum-shaped parameters) and the
    rules that convert it."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from flax_registry.convert import LINEAR, Map, Rule, Scanned, Stacked, einsum_layout

    d, f, n, k, h = c["hidden"], c["inter"], c["heads"], c["kv_heads"], c["head_dim"]

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: Any, _: Any) -> Any:
            def p(name: str, shape: tuple[int, ...]) -> Any:
                return self.param(name, nn.initializers.normal(), shape)

            q, kv, o = p("q", (n, d, h)), p("kv", (2, k, d, h)), p("o", (n, h, d))
            gate_up, down = p("gate_up", (2, d, f)), p("down", (f, d))
            y = x * p("ln1", (d,))
            keys, values = jnp.einsum("BSD,CKDH->CBSKH", y, kv)
            mix = jnp.einsum("BTD,NDH->BTNH", y, q) + jnp.repeat(keys + values, n // k, axis=2)
            x = x + jnp.einsum("BTNH,NHD->BTD", mix, o)  # structure, not attention
            gate, up = jnp.einsum("BTD,SDF->SBTF", x * p("ln2", (d,)), gate_up)
            return x + (jax.nn.silu(gate) * up) @ down, None

    class Decoder(nn.Module):
        def setup(self) -> None:
            self.embed_tokens = nn.Embed(c["vocab"], d)
            scan = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=c["layers"]
            )
            self.layers = scan()
            self.norm = nn.RMSNorm()

        def __call__(self, ids: Any) -> Any:
            return self.norm(self.layers(self.embed_tokens(ids), None)[0])

    layer = Rule(
        Map("self_attn.q_proj.weight", "q", layout=einsum_layout("BTD,NDH->BTNH")),
        Stacked(
            ("self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            "kv",
            layout=einsum_layout("BSD,KDH->BSKH"),
        ),
        Map("self_attn.o_proj.weight", "o", layout=einsum_layout("BTNH,NHD->BTD")),
        Stacked(("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up", layout=LINEAR),
        Map("mlp.down_proj.weight", "down", layout=LINEAR),
        Map("input_layernorm.weight", "ln1"),
        Map("post_attention_layernorm.weight", "ln2"),
    )
    return Decoder(), {"layers": Scanned(rule=layer)}


# --- building the checkpoint -----------------------------------------------------------------


class _Random:
    """A tensor generated when the writer asks for it (the builder never holds the model)."""

    def __init__(self, shape: tuple[int, ...], seed: int) -> None:
        self.shape, self.dtype, self.seed = shape, np.dtype(np.float32), seed

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.random.default_rng(self.seed).random(self.shape, dtype=np.float32) - 0.5


def build(directory: Path, c: dict[str, int]) -> None:
    from flax_registry.io import save_safetensors

    shapes = torch_shapes(c)
    tensors = {k: _Random(s, i) for i, (k, s) in enumerate(shapes.items())}
    save_safetensors(tensors, directory, max_shard_size="200MB")


# --- the measured approaches (each in its own process) ---------------------------------------


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _begin() -> tuple[float, int]:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # restart the high-water mark
        f.write("5")
    return time.perf_counter(), _rss_now()


def run_flax_registry(path: Path, c: dict[str, int]) -> tuple[float, int, Any]:
    import jax
    import jax.numpy as jnp

    from flax_registry.convert import from_torch

    model, rules = scanned_model(c)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    start, base = _begin()
    variables, report = from_torch(model, path, variables=abstract, rules=rules)
    jax.block_until_ready(variables)
    assert report.ok, report
    return start, base, variables


def run_naive(path: Path, c: dict[str, int]) -> tuple[float, int, Any]:
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    n, k, h, d = c["heads"], c["kv_heads"], c["head_dim"], c["hidden"]
    start, base = _begin()
    sd: dict[str, np.ndarray] = {}
    for shard in sorted(path.glob("*.safetensors")):
        sd.update(load_file(shard))

    def stack(fn: Any) -> Any:
        return jnp.asarray(np.stack([fn(f"layers.{i}.") for i in range(c["layers"])]))

    def kernel(key: str, heads: int) -> np.ndarray:  # (heads*h, d) -> (heads, d, h)
        return sd[key].reshape(heads, h, d).transpose(0, 2, 1)

    a = "self_attn."
    layers = {
        "q": stack(lambda p: kernel(p + a + "q_proj.weight", n)),
        "kv": stack(lambda p: np.stack([kernel(p + a + f"{x}_proj.weight", k) for x in "kv"])),
        "o": stack(lambda p: sd[p + a + "o_proj.weight"].reshape(d, n, h).transpose(1, 2, 0)),
        "gate_up": stack(
            lambda p: np.stack([sd[p + f"mlp.{x}_proj.weight"].T for x in ("gate", "up")])
        ),
        "down": stack(lambda p: sd[p + "mlp.down_proj.weight"].T),
        "ln1": stack(lambda p: sd[p + "input_layernorm.weight"]),
        "ln2": stack(lambda p: sd[p + "post_attention_layernorm.weight"]),
    }
    out = {
        "embed_tokens": {"embedding": jnp.asarray(sd["embed_tokens.weight"])},
        "layers": layers,
        "norm": {"scale": jnp.asarray(sd["norm.weight"])},
    }
    return start, base, (sd, out)


def run_floor(path: Path, c: dict[str, int]) -> tuple[float, int, Any]:
    files = sorted(path.glob("*.safetensors"))
    start, base = _begin()
    buffer = np.empty(sum(f.stat().st_size for f in files), np.uint8)
    view, offset = memoryview(buffer.data), 0
    for file in files:
        with open(file, "rb", buffering=0) as fh:
            end = offset + file.stat().st_size
            while offset < end:
                offset += fh.readinto(view[offset : min(end, offset + (64 << 20))])
    return start, base, buffer


APPROACHES = {"flax_registry": run_flax_registry, "naive": run_naive, "floor": run_floor}


def child(approach: str, path: str, size: str) -> None:
    import jax

    jax.devices()
    start, base, result = APPROACHES[approach](Path(path), SIZES[size])
    wall = time.perf_counter() - start
    peak = _high_water_mark()
    print(json.dumps({"wall": wall, "extra": peak - base}))
    del result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("APPROACH", "PATH", "SIZE"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    c = SIZES[args.size]
    shapes = torch_shapes(c)
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    layer = sum(int(np.prod(s)) * 4 for k, s in shapes.items() if k.startswith("layers.0."))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), c)
        print(
            f"checkpoint: {len(shapes)} tensors, {total / 2**20:.0f} MiB; one layer "
            f"{layer / 2**20:.1f} MiB ({c['layers']} layers)"
        )
        results: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.repeat):
            for approach in APPROACHES:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", approach, tmp, args.size],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                results.setdefault(approach, []).append(json.loads(out.stdout.splitlines()[-1]))
    floor = float(np.median([r["wall"] for r in results["floor"]]))
    print(
        f"{'approach':<14} {'wall s':>8} {'x floor':>8} {'extra MiB':>10} {'(extra-output)/layer':>21}"
    )
    for approach, runs in results.items():
        wall = float(np.median([r["wall"] for r in runs]))
        extra = float(np.median([r["extra"] for r in runs]))
        print(
            f"{approach:<14} {wall:8.2f} {wall / floor:8.2f} {extra / 2**20:10.1f} "
            f"{(extra - total) / layer:21.2f}"
        )


if __name__ == "__main__":
    main()
