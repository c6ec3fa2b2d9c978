"""Fault-injection driver (run by tests/io/test_atomic_save.py in a subprocess).

For each scenario, an old checkpoint A is overwritten by save_safetensors with B in a forked
child that SIGKILLs itself just before its k-th file operation (creating a temporary file,
fsync, rename, link, unlink), for k = 1, 2, ... until a child completes. After every kill the
directory must read as entirely A or entirely B, both through flax_registry.io and through
safetensors itself (following the index as transformers does); then a new save must succeed
and leave no temporary, staged or superseded file behind.

usage: python _kill_driver.py WORKDIR      (prints one JSON line of results)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from safetensors import safe_open

from flax_registry.io import open_checkpoint, save_safetensors

KEYS = [f"layer{i}.weight" for i in range(6)]


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(64).astype(np.float32) for k in KEYS}  # 256 bytes each


OLD, NEW = _tensors(0), _tensors(1)
SCENARIOS = {  # name: (old shard size, new shard size); None: one file
    "same-shard-count": (512, 512),
    "fewer-shards": (512, 768),
    "single-to-sharded": (None, 512),
    "sharded-to-single": (512, None),
}


def _read_ours(directory: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(directory) as reader:
        return {k: reader.read(k) for k in reader}


def _read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        out = {}
        for key, shard in weight_map.items():
            with safe_open(str(directory / shard), framework="numpy") as f:
                out[key] = f.get_tensor(key)
        return out
    with safe_open(str(directory / "model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # safe_open has no __iter__


def _which(got: dict[str, np.ndarray]) -> str:
    for name, expected in (("old", OLD), ("new", NEW)):
        if sorted(got) == sorted(expected) and all(
            np.array_equal(got[k], expected[k]) for k in expected
        ):
            return name
    return "MIXED"


def _instrument(kill_at: int) -> None:
    """Make the k-th file operation of this process SIGKILL it instead."""
    count = [0]

    def wrap(fn):
        def op(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return op

    for module, name in ((os, "replace"), (os, "link"), (os, "unlink"), (os, "fsync")):
        setattr(module, name, wrap(getattr(module, name)))
    tempfile.mkstemp = wrap(tempfile.mkstemp)


def _save(directory: Path, tensors: dict[str, np.ndarray], shard: int | None) -> None:
    save_safetensors(tensors, directory / "model.safetensors", max_shard_size=shard)


def _expected_files(shard: int | None) -> set[str]:
    if shard is None:
        return {"model.safetensors"}
    n = -(-len(KEYS) * 256 // shard)
    return {"model.safetensors.index.json"} | {
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    }


def run(workdir: Path, name: str, old_shard: int | None, new_shard: int | None) -> dict:
    pristine = workdir / f"{name}-old"
    _save(pristine, OLD, old_shard)
    states: Counter[str] = Counter()
    kill_at = 0
    while True:
        kill_at += 1
        directory = workdir / name
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(pristine, directory)
        pid = os.fork()
        if pid == 0:  # the child: save, killed at its kill_at-th file operation
            try:
                _instrument(kill_at)
                _save(directory, NEW, new_shard)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        ours, theirs = _which(_read_ours(directory)), _which(_read_safetensors(directory))
        if ours != theirs or ours == "MIXED" or (not killed and ours != "new"):
            raise AssertionError(f"{name}: killed before operation {kill_at}: {ours} / {theirs}")
        states[ours] += 1
        _save(directory, NEW, new_shard)  # the next save recovers and cleans up
        left = {p.name for p in directory.iterdir()}
        if _which(_read_ours(directory)) != "new" or left != _expected_files(new_shard):
            raise AssertionError(f"{name}: after a kill at {kill_at}, a new save left {left}")
        if not killed:
            return {"file_operations": kill_at - 1, "kill_points": kill_at, "states": dict(states)}


def main() -> None:
    workdir = Path(sys.argv[1])
    results = {name: run(workdir, name, *sizes) for name, sizes in SCENARIOS.items()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
