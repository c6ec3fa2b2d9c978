"""The row-read path (`preadv` into owned memory) against the mapped-view path and torch.

`reader.read` and `from_torch` read through `io.read_rows`; the mapped view (`reader.view`) is
the path they replaced. Both must give the same bits for every dtype, byte order and format,
by whole tensors or by any cut of their rows, from any number of threads.
"""

from __future__ import annotations

import os
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flax_registry.io import (
    CheckpointError,
    RowChunks,
    _mapped,
    open_checkpoint,
    owned_empty,
    read_rows,
)
from flax_registry.io._mapped import copy_out
from tests.io._samples import sample

DTYPES = [
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
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def _state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "w": sample(dtype, (37, 5), 0),
        "scalar": sample(dtype, (), 1),
        "empty": sample(dtype, (0, 3), 2),
        "cube": sample(dtype, (3, 4, 6), 3),
    }


def _bits(arr: np.ndarray) -> tuple[tuple[int, ...], str, bytes]:
    return arr.shape, str(arr.dtype), np.ascontiguousarray(arr).tobytes()


def _torch_bits(t: torch.Tensor) -> tuple[tuple[int, ...], str, bytes]:
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return tuple(t.shape), str(t.dtype).removeprefix("torch."), raw


def _write(tmp_path: Path, fmt: str, state: dict[str, torch.Tensor]) -> Path:
    if fmt == "safetensors":
        save_file(state, str(tmp_path / "m.safetensors"))
        return tmp_path / "m.safetensors"
    torch.save(state, tmp_path / "m.bin")
    return tmp_path / "m.bin"


def _by_rows(reader: object, key: str, cut: int) -> np.ndarray:
    """The tensor read in row ranges of `cut` rows, each into its part of one buffer."""
    extent = reader.extent(key)  # type: ignore[attr-defined]
    assert extent is not None
    out = owned_empty(extent.shape, extent.dtype)
    if not extent.shape:
        read_rows(extent, 0, 1, out)
        return out
    for a in range(0, extent.shape[0], cut):
        b = min(extent.shape[0], a + cut)
        read_rows(extent, a, b, out[a:b])
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_row_reads_equal_the_mapped_view_and_torch(
    tmp_path: Path, fmt: str, dtype: torch.dtype
) -> None:
    state = _state(dtype)
    path = _write(tmp_path, fmt, state)
    with open_checkpoint(path) as reader:
        for key, t in state.items():
            expected = _torch_bits(t)
            mapped = copy_out(reader.view(key), reader.dtype(key))
            assert _bits(mapped) == expected
            assert _bits(reader.read(key)) == expected
            for cut in (1, 2, 7):
                assert _bits(_by_rows(reader, key, cut)) == expected


def _by_chunks(chunks: RowChunks, reader: object, key: str, cut: int, group: int) -> np.ndarray:
    """The tensor read through `chunks` in chunks of `cut` groups of `group` rows."""
    extent = reader.extent(key)  # type: ignore[attr-defined]
    assert extent is not None and extent.shape and extent.shape[0] % group == 0
    parts = []
    for a in range(0, extent.shape[0], cut * group):
        b = min(extent.shape[0], a + cut * group)
        rows = chunks.read(extent, a, b, group)
        assert rows.shape == ((b - a) // group, group * int(np.prod(extent.shape[1:])))
        assert rows.strides[0] >= rows.shape[1] * extent.dtype.itemsize
        parts.append(rows.reshape((b - a, *extent.shape[1:])).copy())
    return np.concatenate(parts)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_padded_row_chunks_equal_torch(tmp_path: Path, fmt: str, dtype: torch.dtype) -> None:
    """Chunks on a padded pitch (rows of 512 bytes or more at a multiple of 128) and on the
    plain one, one buffer reused over every shape, any group and cut."""
    state = {
        "wide": sample(dtype, (12, 4, 128), 0),  # 512 elements a row: padded for every dtype
        "odd": sample(dtype, (12, 5, 7), 1),  # 35 elements: never padded
        "long": sample(dtype, (6, 1024), 2),
    }
    path = _write(tmp_path, fmt, state)
    chunks = RowChunks()
    with open_checkpoint(path) as reader:
        for key, t in state.items():
            for cut, group in ((1, 1), (5, 1), (12, 1), (2, 2), (1, 3), (4, 3)):
                if t.shape[0] % group == 0:
                    assert _bits(_by_chunks(chunks, reader, key, cut, group)) == _torch_bits(t)
        unit = reader.extent("wide").row_bytes
        assert chunks.read(reader.extent("wide"), 0, 4).strides[0] == unit + 64  # padded


def test_scattered_reads_survive_short_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`preadv` may fill fewer bytes than asked (a signal, a network file system), and one call
    takes at most IOV_MAX buffers: the read goes on where it stopped."""
    state = {"w": sample(torch.float32, (40, 256), 0)}
    path = _write(tmp_path, "safetensors", state)
    preadv = os.preadv

    def short(fd: int, buffers: list[memoryview], offset: int) -> int:
        assert len(buffers) <= 3
        return preadv(fd, [buffers[0][:333]], offset)  # at most 333 bytes of one buffer

    monkeypatch.setattr(_mapped, "IOV_MAX", 3)
    monkeypatch.setattr(_mapped.os, "preadv", short)
    with open_checkpoint(path) as reader:
        assert _bits(_by_chunks(RowChunks(), reader, "w", 17, 2)) == _torch_bits(state["w"])
        assert _bits(_by_rows(reader, "w", 7)) == _torch_bits(state["w"])


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            match = [k for k in replace if info.filename.endswith(k)]
            zout.writestr(info.filename, replace[match[0]] if match else zin.read(info))


def test_big_endian_rows_are_byteswapped(tmp_path: Path) -> None:
    state = {
        "f": sample(torch.float32, (9, 128), 0),  # 512-byte rows: padded chunks
        "h": sample(torch.bfloat16, (9, 4), 1),
        "c": sample(torch.complex64, (9, 64), 2),
        "d": sample(torch.float64, (9,), 3),
    }
    torch.save(state, tmp_path / "le.pt")
    swapped = {"byteorder": b"big"}
    with zipfile.ZipFile(tmp_path / "le.pt") as z:
        for i, t in enumerate(state.values()):
            size = t.element_size() // (2 if t.is_complex() else 1)
            raw = np.frombuffer(z.read(f"le/data/{i}"), dtype=f"<u{size}")
            swapped[f"data/{i}"] = raw.astype(f">u{size}").tobytes()
    _rewrite(tmp_path / "le.pt", tmp_path / "be.pt", swapped)
    with open_checkpoint(tmp_path / "be.pt") as reader:
        for key, t in state.items():
            assert _bits(copy_out(reader.view(key), reader.dtype(key))) == _torch_bits(t)
            assert _bits(reader.read(key)) == _torch_bits(t)
            assert _bits(_by_rows(reader, key, 4)) == _torch_bits(t)
            if t.dim() == 2:
                assert _bits(_by_chunks(RowChunks(), reader, key, 2, 3)) == _torch_bits(t)


def test_non_canonical_bools_read_as_torch_copies_them(tmp_path: Path) -> None:
    state = {"m": torch.zeros(4, 4, dtype=torch.bool)}
    torch.save(state, tmp_path / "b.pt")
    raw = bytes([0, 1, 2, 255] * 4)
    _rewrite(tmp_path / "b.pt", tmp_path / "odd.pt", {"data/0": raw})
    expected = np.frombuffer(raw, np.uint8).reshape(4, 4) != 0
    with open_checkpoint(tmp_path / "odd.pt") as reader:
        whole = reader.read("m")
        rows = _by_rows(reader, "m", 3)
        assert _bits(whole) == _bits(copy_out(reader.view("m"), reader.dtype("m")))
    for got in (whole, rows):
        assert got.view(np.uint8).max() == 1
        np.testing.assert_array_equal(got, expected)


def test_strided_and_compressed_tensors_have_no_extent(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"t": base.t(), "row": base[1], "base": base}
    torch.save(state, tmp_path / "s.pt")
    with open_checkpoint(tmp_path / "s.pt") as reader:
        assert reader.extent("t") is None  # strided: read through the mapping
        row = reader.extent("row")
        assert row is not None and row.shape == (6,)
        for key, t in state.items():
            assert _bits(reader.read(key)) == _torch_bits(t)
    with (
        zipfile.ZipFile(tmp_path / "s.pt") as zin,
        zipfile.ZipFile(tmp_path / "z.pt", "w", zipfile.ZIP_DEFLATED) as zout,
    ):
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with open_checkpoint(tmp_path / "z.pt") as reader:
        assert reader.extent("base") is None
        assert _bits(reader.read("base")) == _torch_bits(base)


def test_arrays_are_aligned_and_own_their_memory(tmp_path: Path) -> None:
    path = _write(tmp_path, "safetensors", {"w": torch.ones(300, 7)})
    with open_checkpoint(path) as reader:
        out = reader.read("w")
    assert out.ctypes.data % 64 == 0 and out.flags.writeable and out.flags.c_contiguous
    assert float(out.sum()) == 2100.0  # still valid after close


def test_kept_arrays_start_on_a_huge_page() -> None:
    from flax_registry.io._fast_read import HUGE_MIN, HUGE_PAGE

    for shape in [(HUGE_MIN // 4,), (1024, 4099), (7, 3)]:
        plain = owned_empty(shape, np.dtype(np.float32))
        kept = owned_empty(shape, np.dtype(np.float32), huge_pages=True)
        big = kept.nbytes >= HUGE_MIN
        assert kept.ctypes.data % (HUGE_PAGE if big else 64) == 0, shape
        assert plain.ctypes.data % 64 == 0 and kept.shape == plain.shape == shape
        kept[...] = 1.5  # all of it writable, and owned by the array's base
        assert float(kept.sum()) == 1.5 * kept.size and kept.base is not None


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_concurrent_row_reads_and_close(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    state = {
        f"w{i}": torch.from_numpy(rng.standard_normal((257, 31)).astype(np.float32))
        for i in range(8)
    }
    path = _write(tmp_path, "safetensors", state)
    before = _open_fds()
    for _ in range(5):
        reader = open_checkpoint(path)
        start = threading.Barrier(8)

        def job(key: str) -> bool:
            start.wait()
            return _bits(_by_rows(reader, key, 5)) == _torch_bits(state[key])

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(job, state))
        reader.close()
        with pytest.raises(CheckpointError, match="closed"):
            reader.read("w0")
    assert _open_fds() == before  # every descriptor closed with its reader


def test_reads_after_the_file_shrank_raise(tmp_path: Path) -> None:
    path = _write(tmp_path, "safetensors", {"w": torch.ones(1000, 10)})
    with open_checkpoint(path) as reader:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 1000)
        with pytest.raises(CheckpointError, match="truncated after it was opened"):
            reader.read("w")
