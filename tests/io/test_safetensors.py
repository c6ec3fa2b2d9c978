"""safetensors reading/writing, checked against the safetensors library and torch."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flax_registry.io import CheckpointError, open_checkpoint, parse_size, save_safetensors
from tests.io._samples import sample

TORCH_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
IDS = [str(d).removeprefix("torch.") for d in TORCH_DTYPES]


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "w": sample(dtype, (4, 6), 0),
        "scalar": sample(dtype, (), 1),
        "empty": sample(dtype, (0, 3), 2),
        "b": sample(dtype, (5,), 3),
    }


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """torch -> numpy by bytes (torch's .numpy() rejects bf16/fp8)."""
    name = str(t.dtype).removeprefix("torch.")
    dtype = np.dtype(getattr(ml_dtypes, name, None) or name)
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return raw.view(dtype).reshape(tuple(t.shape))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(arr: np.ndarray, t: torch.Tensor) -> None:
    assert arr.shape == tuple(t.shape)
    assert str(arr.dtype) == str(t.dtype).removeprefix("torch.")
    got = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    np.testing.assert_array_equal(got, t.contiguous().reshape(-1).view(torch.uint8).numpy())


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=IDS)
def test_reads_files_written_by_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = _tensors(dtype)
    save_file(tensors, tmp_path / "st.safetensors", metadata={"format": "pt"})
    with open_checkpoint(tmp_path / "st.safetensors") as reader:
        assert sorted(reader) == sorted(tensors)
        assert reader.metadata == {"format": "pt"}
        assert reader.format == "safetensors"
        for key, t in tensors.items():
            assert_same(reader.read(key), t)
            assert reader[key].shape == tuple(t.shape)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=IDS)
def test_written_files_load_in_safetensors_and_round_trip(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    tensors = _tensors(dtype)
    arrays = {k: to_numpy(t) for k, t in tensors.items()}
    [path] = save_safetensors(arrays, tmp_path / "out.safetensors", metadata={"a": "b"})
    assert path == tmp_path / "out.safetensors"
    loaded = load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for key, t in tensors.items():
        assert loaded[key].dtype == t.dtype
        assert torch.equal(_bytes(loaded[key]), _bytes(t))
    with open_checkpoint(path) as reader:
        assert list(reader) == list(arrays)  # our writer keeps the caller's order
        assert reader.metadata == {"a": "b"}
        for key, t in tensors.items():
            assert_same(reader.read(key), t)


def test_lazy_tensors_and_readers_can_be_saved_again(tmp_path: Path) -> None:
    tensors = _tensors(torch.bfloat16)
    save_file(tensors, tmp_path / "a.safetensors")
    with open_checkpoint(tmp_path / "a.safetensors") as reader:
        save_safetensors(reader, tmp_path / "b.safetensors")
    loaded = load_file(tmp_path / "b.safetensors")
    for key, t in tensors.items():
        assert torch.equal(_bytes(loaded[key]), _bytes(t))


def test_save_streams_one_tensor_at_a_time(tmp_path: Path) -> None:
    arrays = {f"t{i}": np.full((1024, 1024), i, np.float32) for i in range(6)}  # 4 MiB each
    save_safetensors(arrays, tmp_path / "src.safetensors")
    del arrays
    with open_checkpoint(tmp_path / "src.safetensors") as reader:
        tracemalloc.start()
        try:
            save_safetensors(reader, tmp_path / "dst.safetensors")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 6 * 2**20, peak  # one 4 MiB tensor at a time, not 24 MiB
    with open_checkpoint(tmp_path / "dst.safetensors") as reader:
        for i in range(6):
            assert (reader.read(f"t{i}") == i).all()


def test_sharded_write_and_read_back(tmp_path: Path) -> None:
    tensors = {f"layer{i}.weight": sample(torch.float32, (16, 8), i) for i in range(5)}
    tensors["tiny"] = sample(torch.int64, (3,), 9)
    arrays = {k: t.numpy() for k, t in tensors.items()}
    written = save_safetensors(
        arrays, tmp_path / "model.safetensors", max_shard_size=600, metadata={"k": "v"}
    )
    names = [p.name for p in written]
    assert names == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)] + [
        "model.safetensors.index.json"
    ]
    assert not (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob(".*tmp"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    assert index["weight_map"]["tiny"] == "model-00005-of-00005.safetensors"
    merged = {}
    for shard in written[:-1]:
        merged.update(load_file(shard))
    for key, t in tensors.items():
        assert torch.equal(merged[key], t)
    for opened in (tmp_path / "model.safetensors.index.json", tmp_path):
        with open_checkpoint(opened) as reader:
            assert reader.format == "safetensors-index"
            assert list(reader) == list(arrays)
            assert reader.metadata["k"] == "v"
            for key, t in tensors.items():
                assert_same(reader.read(key), t)


def test_no_sharding_below_the_limit(tmp_path: Path) -> None:
    written = save_safetensors(
        {"a": np.ones(4, np.float32)}, tmp_path / "m.safetensors", max_shard_size="1MB"
    )
    assert written == [tmp_path / "m.safetensors"]


@pytest.mark.parametrize(
    "index",
    [
        (slice(1, 3),),
        (slice(None), slice(2, 7, 2)),
        (2,),
        (Ellipsis, -1),
        (slice(None, None, -1), 0),
        (slice(5, 5),),
    ],
)
def test_read_slice_equals_numpy_slice(tmp_path: Path, index: tuple[object, ...]) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((6, 8), dtype=np.float32),
        "bf16": rng.standard_normal((6, 8)).astype(ml_dtypes.bfloat16),
        "i8": rng.integers(-100, 100, (6, 8)).astype(np.int8),
    }
    save_safetensors(arrays, tmp_path / "s.safetensors")
    with open_checkpoint(tmp_path / "s.safetensors") as reader:
        for key, full in arrays.items():
            part = reader.read_slice(key, index)
            assert part.dtype == full.dtype
            np.testing.assert_array_equal(
                part.view(np.uint8), np.ascontiguousarray(full[index]).view(np.uint8)
            )
            np.testing.assert_array_equal(reader[key][index], full[index])


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": np.zeros(3, np.float32)}, path)

    class Boom:
        shape = (2,)
        dtype = np.dtype(np.float32)

        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("failed while producing the tensor")

    with pytest.raises(RuntimeError, match="failed while producing"):
        save_safetensors({"b": np.ones(2, np.float32), "c": Boom()}, path)
    with open_checkpoint(path) as reader:  # the old file is intact
        assert list(reader) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_save_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'x' has dtype object"):
        save_safetensors({"x": np.array([None])}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="tensor names must be str"):
        save_safetensors({"__metadata__": np.ones(1)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="metadata must map str to str"):
        save_safetensors({"a": np.ones(1)}, tmp_path / "x.safetensors", metadata={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="max_shard_size='5 parsecs'"):
        save_safetensors({"a": np.ones(1)}, tmp_path / "x.safetensors", max_shard_size="5 parsecs")


def test_parse_size() -> None:
    assert parse_size(123) == 123
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5kb") == 1500


# -- damaged and mislabelled files ---------------------------------------------------------------


@pytest.fixture
def good(tmp_path: Path) -> Path:
    save_file({"a": torch.randn(32, 8), "b": torch.arange(6)}, tmp_path / "good.safetensors")
    return tmp_path / "good.safetensors"


def _header(path: Path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw


def test_truncated_data(good: Path, tmp_path: Path) -> None:
    raw = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-100])
    with pytest.raises(
        CheckpointError,
        match=r"cut\.safetensors: the header says 1072 bytes of tensor data but the file has 972: .*truncated",
    ):
        open_checkpoint(tmp_path / "cut.safetensors")


def test_truncated_header(good: Path, tmp_path: Path) -> None:
    (tmp_path / "head.safetensors").write_bytes(good.read_bytes()[:40])
    with pytest.raises(
        CheckpointError,
        match=r"head\.safetensors: the safetensors header length is \d+ bytes, which is larger than the file \(40 bytes\)",
    ):
        open_checkpoint(tmp_path / "head.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors: the file has 2 bytes"):
        open_checkpoint(tmp_path / "tiny.safetensors")


def test_huge_header_length(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 9_999_999_999) + b"{}")
    with pytest.raises(
        CheckpointError, match=r"huge\.safetensors: the safetensors header length is 9999999999"
    ):
        open_checkpoint(path)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b'{"a": {"dtype": "F32", "shape": [2], ', r"not valid JSON"),
        (b"[1, 2]", r"not valid JSON \(the header is a list\)"),
        (b'{"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}', r"dtype 'F33'"),
        (
            b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}',
            r"span 8 bytes, but shape \[3\] of F32 needs 12",
        ),
        (
            b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}',
            r"'data_offsets' is \[8, 0\]",
        ),
        (b'{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', r"'shape' is \[-2\]"),
        (
            b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": 1}',
            r"duplicate key 'a'",
        ),
        (b'{"__metadata__": {"n": 1}}', r"__metadata__ must map str to str"),
    ],
)
def test_corrupted_header(tmp_path: Path, header: bytes, match: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: .*" + match):
        open_checkpoint(path)


def test_mislabelled_files_are_read_by_content(good: Path, tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(good.read_bytes())
    torch.save({"z": torch.ones(3)}, tmp_path / "actually_torch.safetensors")
    with open_checkpoint(tmp_path / "weights.bin") as reader:
        assert reader.format == "safetensors"
        assert_same(reader.read("b"), torch.arange(6))
    with open_checkpoint(tmp_path / "actually_torch.safetensors") as reader:
        assert reader.format == "torch"
        assert_same(reader.read("z"), torch.ones(3))


def test_header_length_starting_with_pickle_byte(tmp_path: Path) -> None:
    """A header of 128 + 256k bytes starts with 0x80, like a pickle: it is still safetensors."""
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (128 - len(header))
    path = tmp_path / "w.bin"
    path.write_bytes(struct.pack("<Q", 128) + header + np.arange(2, dtype=np.float32).tobytes())
    with open_checkpoint(path) as reader:
        np.testing.assert_array_equal(reader.read("a"), np.arange(2, dtype=np.float32))


def test_entry_is_rejected_for_safetensors(good: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"good\.safetensors: entry='state_dict' .*safetensors file"
    ):
        open_checkpoint(good, entry="state_dict")
