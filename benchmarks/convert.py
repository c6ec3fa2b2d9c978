"""Checkpoint conversion: wall time and peak memory of `from_torch` against the floor and naive.

Builds a BERT-large-sized checkpoint (24 layers, hidden 1024, vocab 30522: ~335M float32
parameters, ~1.34 GB) as safetensors and as a PyTorch `.bin` (torch.save) in a temp dir, then
measures, each in a fresh subprocess (peak RSS from `getrusage(RUSAGE_SELF).ru_maxrss`):

- `flax_registry`: `from_torch` into the same model written with standard flax layers
  (`nn.Embed`, `nn.Dense`, `nn.LayerNorm`), every array ready on the device;
- `floor`: reading the file's bytes once into one preallocated buffer (one copy);
- `floor+layout`: the floor plus the transposes no conversion can avoid (each tensor copied
  once from the memory-mapped file into its flax layout, one thread, no model or checks);
- `naive`: `torch.load` / `safetensors.torch.load_file`, then numpy transposes and
  `jnp.asarray` per tensor (what hand-written converters do);
- `fr: HF module`: `from_torch` into the real target, transformers' own `FlaxBertModule`
  (a model written elsewhere), given `variables={"params": model.params_shape_tree}`;
- `transformers`: transformers' own converter, `load_pytorch_checkpoint_in_flax_state_dict`,
  into the same `FlaxBertModel` (which has to be initialised first: its random parameters are
  created before the measurement starts, so neither their time nor their memory is counted).

Wall time is the conversion alone (imports excluded). `ru_maxrss` is the process peak
(imports included); `peak` is the RSS high-water mark during the conversion alone (Linux
VmHWM, reset after imports), `extra` that peak minus the RSS after imports: the memory the
conversion itself needed. Targets: wall <= 2x floor, extra <= 1.3x the checkpoint size, and faster
than transformers' converter. Each figure is the median of `--repeat` runs (min-max beside).

    python benchmarks/convert.py               # BERT-large (needs ~3 GB of /tmp, ~6 GB RAM)
    python benchmarks/convert.py --size small  # a quick check
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = {
    "full": dict(layers=24, hidden=1024, inter=4096, vocab=30522, positions=512),
    "small": dict(layers=2, hidden=256, inter=1024, vocab=8000, positions=128),
}


def bert_shapes(
    layers: int, hidden: int, inter: int, vocab: int, positions: int
) -> dict[str, tuple[int, ...]]:
    """The Hugging Face BERT state_dict keys and shapes (torch layout)."""
    h = hidden
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (vocab, h),
        "embeddings.position_embeddings.weight": (positions, h),
        "embeddings.token_type_embeddings.weight": (2, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[f"{p}attention.self.{name}.weight"] = (h, h)
            shapes[f"{p}attention.self.{name}.bias"] = (h,)
        shapes[f"{p}attention.output.dense.weight"] = (h, h)
        shapes[f"{p}attention.output.dense.bias"] = (h,)
        shapes[f"{p}attention.output.LayerNorm.weight"] = (h,)
        shapes[f"{p}attention.output.LayerNorm.bias"] = (h,)
        shapes[f"{p}intermediate.dense.weight"] = (inter, h)
        shapes[f"{p}intermediate.dense.bias"] = (inter,)
        shapes[f"{p}output.dense.weight"] = (h, inter)
        shapes[f"{p}output.dense.bias"] = (h,)
        shapes[f"{p}output.LayerNorm.weight"] = (h,)
        shapes[f"{p}output.LayerNorm.bias"] = (h,)
    shapes["pooler.dense.weight"] = (h, h)
    shapes["pooler.dense.bias"] = (h,)
    return shapes


def bert_model(layers: int, hidden: int, inter: int, vocab: int, positions: int) -> Any:
    """BERT's parameter structure with standard flax layers, named as the torch modules."""
    import flax.linen as nn

    class Embeddings(nn.Module):
        def setup(self) -> None:
            self.word_embeddings = nn.Embed(vocab, hidden)
            self.position_embeddings = nn.Embed(positions, hidden)
            self.token_type_embeddings = nn.Embed(2, hidden)
            self.LayerNorm = nn.LayerNorm(epsilon=1e-12)

        def __call__(self, ids: Any) -> Any:
            pos = self.position_embeddings(np.arange(ids.shape[-1]))
            return self.LayerNorm(
                self.word_embeddings(ids) + pos + self.token_type_embeddings(ids * 0)
            )

    class SelfAttention(nn.Module):
        def setup(self) -> None:
            self.query, self.key, self.value = nn.Dense(hidden), nn.Dense(hidden), nn.Dense(hidden)

        def __call__(self, x: Any) -> Any:
            return self.query(x) + self.key(x) + self.value(x)  # structure only

    class DenseNorm(nn.Module):
        features: int

        def setup(self) -> None:
            self.dense = nn.Dense(self.features)
            self.LayerNorm = nn.LayerNorm(epsilon=1e-12)

        def __call__(self, x: Any) -> Any:
            return self.LayerNorm(self.dense(x))

    class Attention(nn.Module):
        def setup(self) -> None:
            self.self = SelfAttention()
            self.output = DenseNorm(hidden)

        def __call__(self, x: Any) -> Any:
            return self.output(self.self(x))

    class Intermediate(nn.Module):
        def setup(self) -> None:
            self.dense = nn.Dense(inter)

        def __call__(self, x: Any) -> Any:
            return nn.gelu(self.dense(x))

    class Layer(nn.Module):
        def setup(self) -> None:
            self.attention = Attention()
            self.intermediate = Intermediate()
            self.output = DenseNorm(hidden)

        def __call__(self, x: Any) -> Any:
            return self.output(self.intermediate(self.attention(x)))

    class Encoder(nn.Module):
        def setup(self) -> None:
            self.layer = [Layer() for _ in range(layers)]

        def __call__(self, x: Any) -> Any:
            for layer in self.layer:
                x = layer(x)
            return x

    class Pooler(nn.Module):
        def setup(self) -> None:
            self.dense = nn.Dense(hidden)

        def __call__(self, x: Any) -> Any:
            return self.dense(x[:, 0])

    class Bert(nn.Module):
        def setup(self) -> None:
            self.embeddings = Embeddings()
            self.encoder = Encoder()
            self.pooler = Pooler()

        def __call__(self, ids: Any) -> Any:
            return self.pooler(self.encoder(self.embeddings(ids)))

    return Bert()


# --- building the checkpoint -----------------------------------------------------------------


class _Random:
    """A tensor generated when the writer asks for it (the builder never holds the model)."""

    def __init__(self, shape: tuple[int, ...], seed: int) -> None:
        self.shape, self.dtype, self.seed = shape, np.dtype(np.float32), seed

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.random.default_rng(self.seed).random(self.shape, dtype=np.float32) - 0.5


def build(directory: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, Path]:
    import torch

    from flax_registry.io import save_safetensors

    st = directory / "model.safetensors"
    save_safetensors({k: _Random(s, i) for i, (k, s) in enumerate(shapes.items())}, st)
    sd = {k: torch.from_numpy(np.asarray(_Random(s, i))) for i, (k, s) in enumerate(shapes.items())}
    torch.save(sd, directory / "pytorch_model.bin")
    del sd
    gc.collect()
    return {"safetensors": st, "bin": directory / "pytorch_model.bin"}


# --- the measured approaches (each runs in its own process) ----------------------------------


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """The process's peak RSS (`ru_maxrss`: imports included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_high_water_mark() -> bool:
    """Reset Linux's VmHWM so that it measures the conversion alone (False if unsupported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


_BEGIN: dict[str, Any] = {}


def _cpu_seconds() -> float:
    """User + system CPU time of the process so far, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _begin() -> float:
    """Start the measurement: the RSS now is the baseline, the high-water mark restarts."""
    gc.collect()
    _BEGIN["base"] = _rss_now()
    _BEGIN["reset"] = _reset_high_water_mark()
    _BEGIN["cpu"] = _cpu_seconds()
    return time.perf_counter()


def run_floor(path: Path, size: str) -> Any:
    nbytes = path.stat().st_size
    start = _begin()
    buffer = np.empty(nbytes, np.uint8)
    view = memoryview(buffer.data)
    with open(path, "rb", buffering=0) as f:
        offset = 0
        while offset < nbytes:
            offset += f.readinto(view[offset : offset + (64 << 20)])
    return start, buffer


def run_floor_layout(path: Path, size: str) -> Any:
    """The floor plus the transposes a conversion cannot avoid: every tensor copied once from the
    memory-mapped file into its flax layout (Dense kernels transposed, with `copy_tiled`, as
    `to_torch` lays them out), in one thread, with no model, no checks and no device placement."""
    from flax_registry.convert._layout import copy_tiled
    from flax_registry.io import open_checkpoint, owned_empty

    start = _begin()
    out = {}
    with open_checkpoint(path) as reader:
        for key in reader:
            view = reader.view(key)
            if view.ndim == 2 and "embeddings" not in key:
                view = view.T
            out[key] = owned_empty(view.shape, view.dtype)
            copy_tiled(out[key], view)
            reader.release()
    return start, out


def run_flax_registry(path: Path, size: str) -> Any:
    import jax
    import jax.numpy as jnp

    from flax_registry.convert import from_torch

    model = bert_model(**SIZES[size])
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    start = _begin()
    variables, report = from_torch(model, path, variables=abstract)
    jax.block_until_ready(variables)
    assert report.ok, report
    return start, variables


def _hf_config(size: str) -> Any:
    from transformers import BertConfig

    cfg = SIZES[size]
    return BertConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["hidden"] // 64,
        intermediate_size=cfg["inter"],
        max_position_embeddings=cfg["positions"],
    )


def run_flax_registry_hf(path: Path, size: str) -> Any:
    import jax
    from transformers import FlaxBertModel

    from flax_registry.convert import from_torch

    model = FlaxBertModel(_hf_config(size), _do_init=False)
    target = {"params": model.params_shape_tree}
    start = _begin()
    variables, report = from_torch(model.module, path, variables=target)
    jax.block_until_ready(variables)
    assert report.ok, report
    return start, variables


def run_transformers(path: Path, size: str) -> Any:
    import jax
    from transformers import FlaxBertModel
    from transformers.modeling_flax_pytorch_utils import (
        load_pytorch_checkpoint_in_flax_state_dict,
    )

    model = FlaxBertModel(_hf_config(size), _do_init=True)  # the converter needs its params
    jax.block_until_ready(model.params)
    start = _begin()
    params = load_pytorch_checkpoint_in_flax_state_dict(model, str(path), is_sharded=False)
    jax.block_until_ready(params)
    return start, params


def run_naive(path: Path, size: str) -> Any:
    import jax.numpy as jnp
    import torch

    start = _begin()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, weights_only=True)
    converted = {}
    for key, tensor in sd.items():
        array = tensor.numpy()
        if key.endswith("weight") and array.ndim == 2 and "embeddings" not in key:
            array = np.ascontiguousarray(array.T)
        converted[key] = jnp.asarray(array)
    for value in converted.values():
        value.block_until_ready()
    return start, (sd, converted)


APPROACHES = {
    "flax_registry": run_flax_registry,
    "floor": run_floor,
    "floor+layout": run_floor_layout,
    "naive": run_naive,
    "fr: HF module": run_flax_registry_hf,
    "transformers": run_transformers,
}


def child(approach: str, path: str, size: str) -> None:
    import jax  # imports are not part of any measurement

    if approach in ("naive", "transformers"):
        import torch  # noqa: F401
    if approach in ("fr: HF module", "transformers"):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import transformers  # noqa: F401
    jax.devices()
    _warm_page_cache(Path(path))  # every run reads from the OS page cache (see load_floor.py)
    gc.collect()
    base = _rss_now()

    reset = _reset_high_water_mark()
    start, result = APPROACHES[approach](Path(path), size)
    wall = time.perf_counter() - start
    process_peak = _peak_rss()
    peak = _high_water_mark() if reset else process_peak
    print(json.dumps({"wall": wall, "peak": peak, "base": base, "process_peak": process_peak}))
    del result


def measure(approach: str, path: Path, size: str) -> dict[str, float]:
    """One run in a fresh process that imports this checkout's flax_registry."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
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


def _warm_page_cache(path: Path) -> None:
    """Read the file once, so that a load finds it whole in the OS page cache. Each child does
    it right before its measurement: a VM's host may reclaim idle guest page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--child", nargs=2, metavar=("APPROACH", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=3, help="runs per approach (median kept)")
    parser.add_argument(
        "--approaches", nargs="*", default=list(APPROACHES), choices=list(APPROACHES)
    )
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.size)
        return
    shapes = bert_shapes(**SIZES[args.size])
    params = sum(int(np.prod(s)) for s in shapes.values())
    directory = Path(tempfile.mkdtemp(prefix="fr_bench_", dir="/tmp"))
    try:
        paths = build(directory, shapes)
        print(
            f"BERT ({args.size}): {len(shapes)} tensors, {params / 1e6:.1f}M float32 parameters; "
            f"medians of {args.repeat} runs, each in its own process (min-max in brackets)"
        )
        header = (
            f"{'format':<12} {'approach':<14} {'wall s':>7} {'(min-max)':>12} {'x floor':>8} "
            f"{'x layout':>9} {'x transformers':>15} {'extra GB':>9} {'extra/ckpt':>10} "
            f"{'(min-max)':>12}"
        )
        print(header)
        print("-" * len(header))
        for fmt, path in paths.items():
            size = path.stat().st_size
            results = {}
            for approach in args.approaches:
                runs = [measure(approach, path, args.size) for _ in range(args.repeat)]
                walls = sorted(r["wall"] for r in runs)
                extras = sorted((r["peak"] - r["base"]) / size for r in runs)
                results[approach] = (walls, extras)

            for approach, (walls, extras) in results.items():
                print(
                    f"{fmt:<12} {approach:<14} {_median(walls):>7.2f} "
                    f"{f'({walls[0]:.2f}-{walls[-1]:.2f})':>12} {_ratio(results, approach, 'floor'):>8} "
                    f"{_ratio(results, approach, 'floor+layout'):>9} "
                    f"{_ratio(results, approach, 'transformers'):>15} "
                    f"{_median(extras) * size / 1e9:>9.2f} {_median(extras):>10.2f} "
                    f"{f'({extras[0]:.2f}-{extras[-1]:.2f})':>12}"
                )
            print(f"{fmt:<12} checkpoint size {size / 1e9:.2f} GB")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _median(values: list[float]) -> float:
    return float(np.median(values))


def _ratio(results: dict[str, Any], approach: str, baseline: str) -> str:
    if baseline not in results:
        return "-"
    return f"{_median(results[approach][0]) / _median(results[baseline][0]):.2f}"


if __name__ == "__main__":
    main()
