"""Overwriting a (sharded) safetensors checkpoint is one step: a kill between any two file
operations leaves it entirely old or entirely new, and the next save cleans up after it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from flax_registry.io import open_checkpoint, save_safetensors


def test_kill_between_every_file_operation(tmp_path: Path) -> None:
    """Each scenario is replayed once per file operation of the save, SIGKILLed just before
    it (in a forked child); _kill_driver.py checks the directory after every kill, with
    flax_registry and with safetensors itself."""
    driver = Path(__file__).with_name("_kill_driver.py")
    done = subprocess.run(
        [sys.executable, str(driver), str(tmp_path)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        states = result["states"]
        assert result["kill_points"] == result["file_operations"] + 1 > 5, (name, result)
        assert set(states) == {"old", "new"}, (name, states)  # both seen, nothing mixed
        assert sum(states.values()) == result["kill_points"]


def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    tensors = {f"w{i}": np.full(64, i, dtype=np.float32) for i in range(4)}
    save_safetensors(tensors, tmp_path, max_shard_size=512)
    leftovers = [
        ".model-00001-of-00002.safetensors.k1ll3d.tmp",
        ".model.safetensors.index.json.x9.tmp",
        "model-00001-of-00002.staged-0badc0de.safetensors",
        "model-00001-of-00007.safetensors",  # a shard of an older, replaced checkpoint
    ]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"\0" * 1000)
    (tmp_path / "notes.tmp").write_text("not ours")
    written = save_safetensors(tensors, tmp_path, max_shard_size=512)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in written] + ["notes.tmp"]
    )
    with open_checkpoint(tmp_path) as reader:
        for key, value in tensors.items():
            np.testing.assert_array_equal(reader.read(key), value)


def test_overwrite_with_the_same_shard_count_keeps_standard_names(tmp_path: Path) -> None:
    old = {f"w{i}": np.full(64, i, dtype=np.float32) for i in range(4)}
    new = {k: v + 100 for k, v in old.items()}
    save_safetensors(old, tmp_path, max_shard_size=512)
    written = save_safetensors(new, tmp_path, max_shard_size=512)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in written}
    with open_checkpoint(tmp_path) as reader:
        for key, value in new.items():
            np.testing.assert_array_equal(reader.read(key), value)
