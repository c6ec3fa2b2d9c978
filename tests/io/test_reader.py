"""open_checkpoint: format detection, directories, index files, the Mapping API, lazy reads."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flax_registry.io import (
    CheckpointError,
    CheckpointReader,
    LazyTensor,
    open_checkpoint,
    save_safetensors,
)


def assert_same(arr: np.ndarray, t: torch.Tensor) -> None:
    assert arr.shape == tuple(t.shape)
    assert str(arr.dtype) == str(t.dtype).removeprefix("torch.")
    got = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    np.testing.assert_array_equal(got, t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
    )
    return model.state_dict()


def _write_bin_shards(directory: Path, sd: dict[str, torch.Tensor]) -> Path:
    """The sharded pytorch_model.bin layout transformers writes: torch.save shards + index."""
    keys = list(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    index = directory / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_sharded_bin_index_matches_torch(tmp_path: Path) -> None:
    sd = _state_dict()
    index = _write_bin_shards(tmp_path, sd)
    for opened in (index, tmp_path):
        with open_checkpoint(opened) as reader:
            assert reader.format == "torch-index"
            assert list(reader) == list(sd)
            for key, t in sd.items():
                assert_same(reader.read(key), t)


def test_mapping_api_and_lazy_tensors(tmp_path: Path) -> None:
    sd = _state_dict()
    torch.save(sd, tmp_path / "m.pt")
    reader = open_checkpoint(tmp_path / "m.pt")
    assert isinstance(reader, CheckpointReader)
    assert len(reader) == len(sd)
    assert "0.weight" in reader and "nope" not in reader
    assert reader.get("nope") is None
    lazy = reader["0.weight"]
    assert isinstance(lazy, LazyTensor)
    assert (lazy.shape, lazy.dtype, lazy.nbytes, lazy.ndim) == ((8, 4), np.float32, 128, 2)
    np.testing.assert_array_equal(np.asarray(lazy), sd["0.weight"].numpy())
    np.testing.assert_array_equal(lazy[2:5, 1], sd["0.weight"].numpy()[2:5, 1])
    full = reader.read("0.weight")
    full[0, 0] = 123.0  # reads are fresh, writable copies
    assert reader.read("0.weight")[0, 0] != 123.0
    assert reader.dtype("1.num_batches_tracked") == np.int64
    reader.close()
    assert full.sum() != 0  # arrays read earlier survive close()
    with pytest.raises(CheckpointError, match=r"m\.pt: the checkpoint reader is closed"):
        reader.read("0.weight")
    assert "closed" in repr(reader)


def test_missing_key_suggests_close_matches(tmp_path: Path) -> None:
    torch.save(_state_dict(), tmp_path / "m.pt")
    with open_checkpoint(tmp_path / "m.pt") as reader:
        with pytest.raises(
            KeyError, match=r"'1.running_mena' is not in checkpoint .*m\.pt.*'1.running_mean'"
        ):
            reader["1.running_mena"]
        with pytest.raises(KeyError, match=r"'0.wieght'.*Did you mean"):
            reader.read("0.wieght")


def test_directory_resolution(tmp_path: Path) -> None:
    sd = {"a": torch.ones(2)}
    save_file(sd, tmp_path / "model.safetensors")
    torch.save({"b": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as reader:  # model.safetensors wins over pytorch_model.bin
        assert reader.path == tmp_path / "model.safetensors"
    other = tmp_path / "other"
    other.mkdir()
    torch.save(sd, other / "only.pth")
    (other / "notes.txt").write_text("not a checkpoint")
    with open_checkpoint(other) as reader:
        assert list(reader) == ["a"]
    torch.save(sd, other / "second.pt")
    with pytest.raises(
        CheckpointError, match=r"other: the directory holds several .*only\.pth, second\.pt"
    ):
        open_checkpoint(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty: the directory holds no checkpoint file"):
        open_checkpoint(empty)
    with pytest.raises(CheckpointError, match=r"missing\.pt: no such file"):
        open_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"the file is empty"),
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n",
            r"this is a Git LFS pointer",
        ),
        (b"<!DOCTYPE html><html><body>Access denied</body></html>", r"this is an HTML page"),
        (
            b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            r"unrecognised checkpoint format",
        ),
    ],
    ids=["empty", "lfs", "html", "elf"],
)
def test_files_that_are_not_checkpoints(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "weights.dat"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"weights\.dat: " + match):
        open_checkpoint(path)


# -- index files -----------------------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    arrays = {f"w{i}": np.full((8, 8), i, np.float32) for i in range(3)}
    save_safetensors(arrays, tmp_path / "model.safetensors", max_shard_size=300)
    return tmp_path / "model.safetensors.index.json"


def test_index_with_missing_shard(sharded: Path) -> None:
    (sharded.parent / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors\.index\.json: the index lists shard 'model-00002-of-00003\.safetensors', but .* does not exist",
    ):
        open_checkpoint(sharded)


def test_index_invalid_json_and_format(sharded: Path) -> None:
    text = sharded.read_text()
    sharded.write_text(text[: len(text) // 2])
    with pytest.raises(
        CheckpointError, match=r"index\.json: the checkpoint index is not valid JSON"
    ):
        open_checkpoint(sharded)
    sharded.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(
        CheckpointError, match=r"index\.json: the checkpoint index is malformed: no 'weight_map'"
    ):
        open_checkpoint(sharded)
    sharded.write_text(json.dumps({"weight_map": {"w0": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"not a file name inside the index's directory"):
        open_checkpoint(sharded)


def test_index_key_not_in_shard(sharded: Path) -> None:
    index = json.loads(sharded.read_text())
    index["weight_map"]["w0"] = "model-00003-of-00003.safetensors"
    sharded.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=r"index\.json: the index maps 'w0' to shard 'model-00003-of-00003\.safetensors', but that shard has no such tensor",
    ):
        open_checkpoint(sharded)


def test_index_with_truncated_shard(sharded: Path) -> None:
    shard = sharded.parent / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(
        CheckpointError, match=r"model-00001-of-00003\.safetensors: the header says .*truncated"
    ):
        open_checkpoint(sharded)


# -- laziness --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_slice_of_large_tensor_allocates_only_the_slice(tmp_path: Path, fmt: str) -> None:
    big = torch.arange(4096 * 1024, dtype=torch.float32).reshape(4096, 1024)  # 16 MiB
    sd = {f"small{i}": torch.full((16,), float(i)) for i in range(50)} | {"big": big}
    path = tmp_path / "big.bin"
    if fmt == "safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path)
    with open_checkpoint(path) as reader:
        tracemalloc.start()
        try:
            part = reader.read_slice("big", (slice(100, 104), slice(None)))
            small = reader.read("small7")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        np.testing.assert_array_equal(part, big[100:104].numpy())
        np.testing.assert_array_equal(small, sd["small7"].numpy())
        assert peak < 1_000_000, peak  # the slice is 16 KiB; the tensor 16 MiB
        tracemalloc.start()
        try:
            reader.read("big")
            _, peak_full = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert 16 * 2**20 <= peak_full < 20 * 2**20  # one tensor, not the whole file twice


def test_package_does_not_import_torch() -> None:
    code = "import sys, flax_registry.io; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_views_are_zero_copy_read_only_and_survive_release(tmp_path: Path, fmt: str) -> None:
    tensors = {
        "w": torch.randn(64, 32),
        "t": torch.randn(8, 16).t(),  # a strided view in the torch file
        "h": torch.randn(5, 3).to(torch.bfloat16),
    }
    path = tmp_path / ("m.safetensors" if fmt == "safetensors" else "m.pt")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    else:
        torch.save(tensors, path)
    with open_checkpoint(path) as reader:
        for key in tensors:
            view = reader.view(key)
            assert not view.flags.writeable and not view.flags.owndata
            bits = np.ascontiguousarray(view).view(np.uint8)
            np.testing.assert_array_equal(bits, reader.read(key).view(np.uint8))
            reader.release()  # pages dropped from RSS: the view still reads the same bytes
            np.testing.assert_array_equal(view[1:3], reader.read_slice(key, (slice(1, 3),)))
