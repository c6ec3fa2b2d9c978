"""Many threads reading fresh readers of sharded checkpoints at once: no errors, exact bytes.

Each trial opens a new reader (nothing mapped yet), so every shard's first read races with
the other threads' first reads of the same shard: the case that used to close one thread's
file descriptor under another and return a different shard's bytes.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from flax_registry.io import open_checkpoint

TRIALS = 200
THREADS = 8


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer{i}.weight": rng.standard_normal((64, 32)).astype(np.float32) for i in range(16)}


def _hf_index(directory: Path, shards: dict[str, dict[str, np.ndarray]], suffix: str) -> Path:
    weight_map = {key: name for name, part in shards.items() for key in part}
    index = directory / f"model.{suffix}.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _safetensors_index(directory: Path, tensors: dict[str, np.ndarray]) -> Path:
    keys = list(tensors)
    shards = {
        f"model-{i + 1:05d}-of-00004.safetensors": {k: tensors[k] for k in keys[i::4]}
        for i in range(4)
    }
    for name, part in shards.items():
        save_file(part, str(directory / name))  # written by safetensors itself
    return _hf_index(directory, shards, "safetensors")


def _torch_index(directory: Path, tensors: dict[str, np.ndarray]) -> Path:
    keys = list(tensors)
    shards = {
        f"pytorch_model-{i + 1:05d}-of-00004.bin": {k: tensors[k] for k in keys[i::4]}
        for i in range(4)
    }
    for name, part in shards.items():
        torch.save({k: torch.from_numpy(v) for k, v in part.items()}, directory / name)
    return _hf_index(directory, shards, "bin")


@pytest.mark.parametrize("make_index", [_safetensors_index, _torch_index], ids=["st", "torch"])
def test_threads_reading_fresh_readers(tmp_path: Path, make_index) -> None:
    tensors = _tensors(0)
    index = make_index(tmp_path, tensors)
    expected = {k: v.tobytes() for k, v in tensors.items()}
    errors: list[BaseException] = []
    mismatched: list[str] = []
    start = threading.Barrier(THREADS)

    def read_all(reader, keys: list[str]) -> None:
        try:
            start.wait(timeout=10)
        except threading.BrokenBarrierError:
            pass
        for key in keys:
            try:
                if reader.read(key).tobytes() != expected[key]:
                    mismatched.append(key)
                if reader.read_slice(key, (slice(3, 9),)).tobytes() != tensors[key][3:9].tobytes():
                    mismatched.append(key + "[3:9]")
            except BaseException as e:  # every failure is counted
                errors.append(e)

    keys = list(tensors)
    with ThreadPoolExecutor(THREADS) as pool:
        for trial in range(TRIALS):
            start.reset()
            with open_checkpoint(index) as reader:
                # every thread reads every shard, in a different order
                orders = [keys[t:] + keys[:t] for t in range(THREADS)]
                list(pool.map(read_all, [reader] * THREADS, orders))
            assert not errors, f"trial {trial}: {errors[:3]}"
            assert not mismatched, f"trial {trial}: wrong bytes for {mismatched[:5]}"
