"""Loading a checkpoint against the speed of memory, with the peers, in the same run.

Builds a BERT-large-sized checkpoint (~335M float32 parameters, ~1.34 GB) as safetensors and
as a torch `.bin` (`benchmarks/convert.py`), then measures each approach `--repeat` times, each
run in a fresh process (interleaved: run 1 of every approach, then run 2, ..., so that the
machine's load drifts over all of them alike). Each process reads the file once right before
its measurement, so every run finds it whole in the OS page cache: the host of a virtual
machine may reclaim a guest's page cache while it is idle (on this project's VMs, about 3% of
a 1.3 GB file every 30 s, with 20 GB free), and a run would re-read that part from disk, at
random. Wall time is the load alone (imports and model construction excluded), every array
ready; `extra` is the RSS high-water mark during the load minus the RSS before it (Linux
VmHWM, reset after imports), over the file.

Torch-layout target (`fr.nn` layers keep torch's layouts: no transposes):

- `floor`: `readinto` the whole file into one preallocated buffer (one copy, one thread);
- `floor x2`: the same with two threads (`preadv` of halves), for reference;
- `safetensors.flax`: `safetensors.flax.load_file` (safetensors only);
- `orbax v1`: `ocp.load_pytree` with the SAFETENSORS layout onto the default device;
- `torch.load+jnp`: `torch.load(weights_only=True)` then `jnp.asarray` per tensor (`.bin`);
- `fr torch-layout`: `fr.from_torch(model, path)` into a `flax_registry.nn` BERT (the plan,
  abstract shapes included, is part of the time).

Flax-layout target (`nn.Dense` kernels transposed):

- `floor+layout`: each tensor copied once from the mapped file into its flax layout with a
  tiled transpose, one thread, no model, no checks (`benchmarks/convert.py`);
- `fr flax-layout`: `fr.from_torch(model, path, variables=abstract)` into the same BERT written
  with flax's `nn.Embed`/`nn.Dense`/`nn.LayerNorm`;
- `fr: HF module`: `from_torch` into transformers' own `FlaxBertModule`;
- `transformers`: transformers' converter into `FlaxBertModel` (initialised before timing).

    python benchmarks/load_floor.py                 # ~3 GB in /tmp, ~6 GB RAM
    python benchmarks/load_floor.py --size small --repeat 3
    python benchmarks/load_floor.py --targets flax --approaches "fr flax-layout"  # + the floor
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert  # (the BERT shapes, models and measurement helpers)

REPO = Path(__file__).resolve().parent.parent

TORCH_LAYOUT = [
    "floor",
    "floor x2",
    "safetensors.flax",
    "orbax v1",
    "torch.load+jnp",
    "fr torch-layout",
]
FLAX_LAYOUT = ["floor", "floor+layout", "fr flax-layout", "fr: HF module", "transformers"]
SAFETENSORS_ONLY = {"safetensors.flax", "orbax v1"}
BIN_ONLY = {"torch.load+jnp"}


def fr_bert(layers: int, hidden: int, inter: int, vocab: int, positions: int) -> Any:
    """BERT's structure with `flax_registry.nn` layers (torch's names and layouts)."""
    import flax_registry as fr
    from flax_registry import nn

    class Embeddings(fr.Module):
        def setup(self) -> None:
            self.word_embeddings = nn.Embedding(vocab, hidden)
            self.position_embeddings = nn.Embedding(positions, hidden)
            self.token_type_embeddings = nn.Embedding(2, hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    class SelfAttention(fr.Module):
        def setup(self) -> None:
            self.query = nn.Linear(hidden, hidden)
            self.key = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)

    class DenseNorm(fr.Module):
        features_in: int

        def setup(self) -> None:
            self.dense = nn.Linear(self.features_in, hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    class Attention(fr.Module):
        def setup(self) -> None:
            self.self = SelfAttention()
            self.output = DenseNorm(hidden)

    class Intermediate(fr.Module):
        def setup(self) -> None:
            self.dense = nn.Linear(hidden, inter)

    class Layer(fr.Module):
        def setup(self) -> None:
            self.attention = Attention()
            self.intermediate = Intermediate()
            self.output = DenseNorm(inter)

    class Encoder(fr.Module):
        def setup(self) -> None:
            self.layer = [Layer() for _ in range(layers)]

    class Pooler(fr.Module):
        def setup(self) -> None:
            self.dense = nn.Linear(hidden, hidden)

    class Bert(fr.Module):
        def setup(self) -> None:
            self.embeddings = Embeddings()
            self.encoder = Encoder()
            self.pooler = Pooler()

    return Bert()


# --- the approaches (each runs in its own process) ---------------------------------------------


def run_floor_x2(path: Path, size: str) -> Any:
    nbytes = path.stat().st_size
    start = convert._begin()
    buffer = np.empty(nbytes, np.uint8)
    view = memoryview(buffer.data)
    fd = os.open(path, os.O_RDONLY)
    half = nbytes // 2

    def read(a: int, b: int) -> None:
        while a < b:
            a += os.preadv(fd, [view[a:b]], a)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda ab: read(*ab), [(0, half), (half, nbytes)]))
    os.close(fd)
    return start, buffer


def run_safetensors_flax(path: Path, size: str) -> Any:
    import jax
    from safetensors.flax import load_file

    start = convert._begin()
    out = load_file(str(path))
    jax.block_until_ready(out)
    return start, out


def run_orbax(path: Path, size: str) -> Any:
    import jax
    from orbax.checkpoint import v1 as ocp

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.Context(checkpoint_layout=ocp.options.CheckpointLayout.SAFETENSORS):
        meta = ocp.metadata(path).metadata
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), meta
        )
        start = convert._begin()
        out = ocp.load_pytree(path, abstract)
        jax.block_until_ready(out)
    return start, out


def run_torch_load(path: Path, size: str) -> Any:
    import jax.numpy as jnp
    import torch

    start = convert._begin()
    sd = torch.load(path, weights_only=True)
    out = {k: jnp.asarray(t.numpy()) for k, t in sd.items()}
    for value in out.values():
        value.block_until_ready()
    return start, out


def run_fr_torch_layout(path: Path, size: str) -> Any:
    import jax

    import flax_registry as fr

    model = fr_bert(**convert.SIZES[size])
    start = convert._begin()
    variables, report = fr.from_torch(model, path)
    jax.block_until_ready(variables)
    assert report.ok, report
    return start, variables


APPROACHES = {
    "floor": convert.run_floor,
    "floor x2": run_floor_x2,
    "safetensors.flax": run_safetensors_flax,
    "orbax v1": run_orbax,
    "torch.load+jnp": run_torch_load,
    "fr torch-layout": run_fr_torch_layout,
    "floor+layout": convert.run_floor_layout,
    "fr flax-layout": convert.run_flax_registry,
    "fr: HF module": convert.run_flax_registry_hf,
    "transformers": convert.run_transformers,
}


def _pretouch(nbytes: int) -> None:
    """Touch and free `nbytes` of memory before measuring. On a virtual machine that returns
    freed guest memory to its host (virtio balloon free page reporting), the first touch of
    memory another process freed a moment ago faults at the host too, several times slower
    and at random; every approach alike then starts from memory the host has backed."""
    block = np.ones(nbytes, np.uint8)
    del block


def _stolen_seconds() -> float:
    """CPU time the hypervisor gave to other guests, all CPUs together (Linux `/proc/stat`
    steal; 0 elsewhere). On a shared host this varies by the minute: a run that lost most of
    a core to it says little about a two-thread loader."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def child(approach: str, path: str, size: str) -> None:
    import gc

    import jax

    if approach in ("torch.load+jnp", "transformers"):
        import torch  # noqa: F401
    if approach in ("fr: HF module", "transformers"):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import transformers  # noqa: F401
    if approach == "orbax v1":
        from orbax.checkpoint import v1  # noqa: F401
    jax.devices()
    convert._warm_page_cache(Path(path))  # whole in the page cache (see the module's docstring)
    if os.environ.get("FR_BENCH_PRETOUCH", "1") == "1":
        _pretouch(Path(path).stat().st_size * 2)
    gc.collect()
    stolen = _stolen_seconds()
    start, result = APPROACHES[approach](Path(path), size)
    wall = time.perf_counter() - start
    stolen = _stolen_seconds() - stolen
    cpu = convert._cpu_seconds() - convert._BEGIN["cpu"]
    peak = convert._high_water_mark() if convert._BEGIN["reset"] else convert._peak_rss()
    base = convert._BEGIN["base"]
    print(json.dumps({"wall": wall, "cpu": cpu, "peak": peak, "base": base, "steal": stolen}))
    del result


def measure(approach: str, path: Path, size: str) -> dict[str, float]:
    """One run in a fresh process that imports this checkout's flax_registry."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    out = subprocess.run(
        [sys.executable, __file__, "--child", approach, str(path), "--size", size],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{approach} on {path.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    v = sorted(values)
    return f"{fmt.format(v[0])} / {fmt.format(float(np.median(v)))} / {fmt.format(v[-1])}"


def table(
    title: str, fmt: str, size_bytes: int, results: dict[str, list[dict[str, float]]]
) -> None:
    """Each figure as min / median / max. `x floor`: each run's wall time over the floor's run
    of the same round (the runs of a round follow each other, so they share the machine's
    load); `cpu x floor` the same for the CPU time of the process (every thread); `steal s`
    the CPU time the host took from this machine during the run."""
    floors = results["floor"]
    print(f"\n{title} ({fmt}, {size_bytes / 1e9:.2f} GB): min / median / max of each figure")
    header = (
        f"{'approach':<18} {'wall s':>20} {'x floor':>20} {'cpu s':>20} {'cpu x floor':>20} "
        f"{'extra RSS / file':>20} {'steal s':>20}"
    )
    print(header)
    print("-" * len(header))
    for approach, runs in results.items():
        walls = [r["wall"] for r in runs]
        ratios = [r["wall"] / f["wall"] for r, f in zip(runs, floors)]
        cpus = [r["cpu"] for r in runs]
        cpu_ratios = [r["cpu"] / max(f["cpu"], 1e-9) for r, f in zip(runs, floors)]
        extras = [(r["peak"] - r["base"]) / size_bytes for r in runs]
        steals = [r.get("steal", 0.0) for r in runs]
        print(
            f"{approach:<18} {spread(walls):>20} {spread(ratios):>20} {spread(cpus):>20} "
            f"{spread(cpu_ratios):>20} {spread(extras):>20} {spread(steals):>20}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(convert.SIZES), default="full")
    parser.add_argument("--child", nargs=2, metavar=("APPROACH", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=5, help="runs per approach")
    parser.add_argument("--formats", nargs="*", default=["safetensors", "bin"])
    parser.add_argument("--targets", nargs="*", default=["torch", "flax"])
    parser.add_argument("--dir", help="reuse the checkpoint files in this directory")
    parser.add_argument(
        "--approaches", nargs="*", help="measure only these (the floor is always measured)"
    )
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.size)
        return
    shapes = convert.bert_shapes(**convert.SIZES[args.size])
    directory = (
        Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fr_load_", dir="/tmp"))
    )
    try:
        paths = {
            "safetensors": directory / "model.safetensors",
            "bin": directory / "pytorch_model.bin",
        }
        if not all(p.exists() for p in paths.values()):
            paths = convert.build(directory, shapes)
        params = sum(int(np.prod(s)) for s in shapes.values())
        print(
            f"BERT ({args.size}): {len(shapes)} tensors, {params / 1e6:.1f}M float32 parameters; "
            f"{args.repeat} runs per approach, each in its own process, interleaved; "
            f"{os.cpu_count()} CPUs"
        )
        for fmt in args.formats:
            path = paths[fmt]
            for target in args.targets:
                names = TORCH_LAYOUT if target == "torch" else FLAX_LAYOUT
                skip = BIN_ONLY if fmt == "safetensors" else SAFETENSORS_ONLY
                names = [n for n in names if n not in skip]
                if args.approaches:
                    names = [n for n in names if n == "floor" or n in args.approaches]
                results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
                for _ in range(args.repeat):
                    for name in names:
                        results[name].append(measure(name, path, args.size))
                title = "torch-layout target" if target == "torch" else "flax-layout target"
                table(title, fmt, path.stat().st_size, results)
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
