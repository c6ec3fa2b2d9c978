"""Malformed and crafted checkpoint files: refused with a CheckpointError naming the file (where
torch / safetensors refuse them, or where NumPy cannot hold the tensor), or read exactly as torch
reads them. Each case is checked against the reference library on the same file, and through
the CLI (exit 2, one line naming the file)."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flax_registry import cli
from flax_registry.io import CheckpointError, open_checkpoint

from . import _crafted as c


def _read_all(path: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as reader:
        return {k: reader.read(k) for k in reader}


def _torch_reads(path: Path) -> dict[str, torch.Tensor] | None:
    """What torch.load(weights_only=True) returns, None if it refuses the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.suffix == ".safetensors":
                return load_file(str(path))
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception:
        return None


def _cli_refuses(path: Path, tmp_path: Path) -> None:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(["convert", str(path), str(tmp_path / "out.safetensors"), "--no-progress"])
    assert code == 2
    assert err.getvalue().count("\n") == 1 and str(path) in err.getvalue(), err.getvalue()


def assert_refused(path: Path, tmp_path: Path, *, reference_refuses: bool | None = True) -> str:
    """Refused by flax_registry (CheckpointError naming the file) and by the CLI; by torch /
    safetensors too when ``reference_refuses`` (None: whatever they do)."""
    with pytest.raises(CheckpointError) as info:
        _read_all(path)
    assert str(path) in str(info.value)
    if reference_refuses is not None:
        assert (_torch_reads(path) is None) == reference_refuses
    _cli_refuses(path, tmp_path)
    return str(info.value)


def assert_reads_as_torch(path: Path) -> None:
    expected = _torch_reads(path)
    assert expected is not None
    ours = _read_all(path)
    assert list(ours) == list(dict.keys(expected))
    for key, t in dict.items(expected):
        assert ours[key].dtype == np.dtype(str(t.dtype).removeprefix("torch."))
        np.testing.assert_array_equal(ours[key], t.detach().numpy())


# -- zip layer: every zipfile/zlib exception becomes a CheckpointError naming the file ----------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.save({"a": torch.arange(6.0), "b": torch.arange(3)}, tmp_path / "good.pt")
    return tmp_path / "good.pt"


def _patch_central(
    src: Path, dst: Path, name_suffix: str, patch: Callable[[bytearray, int], None]
) -> Path:
    raw = bytearray(src.read_bytes())
    at = next(
        a
        for a in c.central_entries(bytes(raw))
        if c.central_name(raw, a).endswith(name_suffix.encode())
    )
    patch(raw, at)
    dst.write_bytes(bytes(raw))
    return dst


def _set16(offset: int, value: int, *, local: bool = False) -> Callable[[bytearray, int], None]:
    def patch(raw: bytearray, at: int) -> None:
        struct.pack_into("<H", raw, at + offset, value)
        if local:  # the same field of the local header (CD offset - 2)
            (header,) = struct.unpack_from("<L", raw, at + 42)
            struct.pack_into("<H", raw, header + offset - 2, value)

    return patch


@pytest.mark.parametrize(
    ("suffix", "patch", "torch_refuses"),
    [
        ("data.pkl", _set16(10, 99, local=True), True),  # compression method 99
        ("data.pkl", _set16(10, 14, local=True), True),  # LZMA over stored bytes: LZMAError
        ("data.pkl", _set16(8, 0x0020), True),  # compressed patch data
        ("data.pkl", _set16(8, 0x0040), True),  # strong encryption
        ("data.pkl", _set16(8, 0x0001), True),  # encrypted: RuntimeError in zipfile
        ("data.pkl", _set16(6, 99), False),  # "zip file version 9.9": torch does not check
    ],
    ids=["method", "lzma", "patch-flag", "strong-encryption", "encrypted", "version-needed"],
)
def test_central_directory_fields(
    saved: Path, tmp_path: Path, suffix: str, patch: Callable[[bytearray, int], None], torch_refuses
) -> None:
    bad = _patch_central(saved, tmp_path / "bad.pt", suffix, patch)
    assert_refused(bad, tmp_path, reference_refuses=torch_refuses)


def test_undecodable_entry_name(saved: Path, tmp_path: Path) -> None:
    def patch(raw: bytearray, at: int) -> None:
        struct.pack_into("<H", raw, at + 8, 0x0800)  # names are UTF-8 ...
        raw[at + 46 + len("good/.")] = 0xFF  # ... but this one is not

    bad = _patch_central(saved, tmp_path / "name.pt", ".format_version", patch)
    message = assert_refused(bad, tmp_path, reference_refuses=None)
    assert "UnicodeDecodeError" in message


def test_zip64_offset_past_any_file(saved: Path, tmp_path: Path) -> None:
    raw = bytearray(saved.read_bytes())
    entries = c.central_entries(bytes(raw))
    at = next(a for a in entries if c.central_name(raw, a).endswith(b"data.pkl"))
    n, m, k = struct.unpack_from("<HHH", raw, at + 28)
    extra = struct.pack("<HHQ", 1, 8, 2**64 - 1)  # zip64 extra: local header offset
    struct.pack_into("<L", raw, at + 42, 0xFFFFFFFF)
    struct.pack_into("<H", raw, at + 30, m + len(extra))
    raw[at + 46 + n + m : at + 46 + n + m] = extra
    eocd = bytes(raw).rfind(b"PK\x05\x06")
    (cd_size,) = struct.unpack_from("<L", raw, eocd + 12)
    struct.pack_into("<L", raw, eocd + 12, cd_size + len(extra))
    (tmp_path / "zip64.pt").write_bytes(bytes(raw))
    assert_refused(tmp_path / "zip64.pt", tmp_path)


def test_duplicated_entry_name_is_refused(tmp_path: Path) -> None:
    """torch reads the first copy, zipfile the last: neither is trustworthy, so refuse."""
    pkl = c.state_dict({"a": c.tensor("0")})
    path = c.torch_zip(
        tmp_path / "dup.pt",
        pkl,
        {"0": np.arange(4, dtype=np.float32).tobytes()},
        extra=[("archive/data/0", np.zeros(4, dtype=np.float32).tobytes())],
    )
    message = assert_refused(path, tmp_path, reference_refuses=False)
    assert "2 entries named 'archive/data/0'" in message


def test_record_size_must_match_the_persistent_id(tmp_path: Path) -> None:
    for name, numel in (("short.pt", 6), ("long.pt", 2)):
        pkl = c.state_dict({"a": c.tensor("0", numel=numel, size=c.tup((2,)))})
        path = c.torch_zip(tmp_path / name, pkl, {"0": np.arange(4, dtype=np.float32).tobytes()})
        message = assert_refused(path, tmp_path)
        assert "record size (16 bytes) does not match expected size" in message


def test_storage_key_keeps_its_first_type(tmp_path: Path) -> None:
    """Two persistent ids name storage '0' with different types: torch gives both tensors the
    first one's dtype (here float32), so must we."""
    ints = c.tensor("0", storage="LongStorage", numel=2, size=c.tup((2,)))
    pkl = c.state_dict({"f": c.tensor("0", numel=4), "i": ints})
    path = c.torch_zip(tmp_path / "shared.pt", pkl, {"0": np.arange(4, dtype=np.float32).tobytes()})
    assert_reads_as_torch(path)
    assert _read_all(path)["i"].dtype == np.float32


# -- tensor layouts: validated once, for both formats -------------------------------------------


def test_crafted_shapes_and_strides(tmp_path: Path) -> None:
    data = {"0": np.arange(4, dtype=np.float32).tobytes()}
    cases = {
        "empty-huge.pt": c.tensor(size=c.tup((0, 2**70)), stride=c.tup((1, 1))),
        "65-dims.pt": c.tensor(size=c.tup((1,) * 65), stride=c.tup((1,) * 65)),
        "stride-overflow.pt": c.tensor(size=c.tup((2, 2)), stride=c.tup((2**62, 1))),
    }
    for name, t in cases.items():
        path = c.torch_zip(tmp_path / name, c.state_dict({"a": t}), data)
        assert_refused(path, tmp_path, reference_refuses=None)
    # a size-1 dimension's stride is never stepped along: torch reads it, and so do we
    odd = c.tensor(size=c.tup((1, 4)), stride=c.tup((2**62, 1)))
    assert_reads_as_torch(c.torch_zip(tmp_path / "size-one.pt", c.state_dict({"a": odd}), data))


def _safetensors(path: Path, header: dict | str, data: bytes) -> Path:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_safetensors_shapes(tmp_path: Path) -> None:
    for name, shape in (("huge", [0, 2**70]), ("dims", [1] * 65), ("overflow", [2**40, 2**40])):
        header = {
            "a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 if name == "dims" else 0]}
        }
        path = _safetensors(
            tmp_path / f"{name}.safetensors", header, b"\0" * 4 if name == "dims" else b""
        )
        assert_refused(path, tmp_path, reference_refuses=None)


@pytest.mark.parametrize(
    ("offsets", "size", "words"),
    [
        ([[0, 8], [16, 24]], 24, "invalid offset for tensor 'b'"),  # gap
        ([[0, 8], [4, 12]], 12, "invalid offset for tensor 'b'"),  # overlap
        ([[0, 8], [8, 16]], 20, "not fully covered"),  # stops short of the end
        ([[8, 16], [16, 24]], 24, "does not start at byte 0"),
    ],
    ids=["gap", "overlap", "short", "late-start"],
)
def test_safetensors_offsets_must_tile_the_data(tmp_path: Path, offsets, size, words) -> None:
    header = {k: {"dtype": "F32", "shape": [2], "data_offsets": o} for k, o in zip("ab", offsets)}
    path = _safetensors(tmp_path / "gaps.safetensors", header, bytes(range(size)))
    assert words in assert_refused(path, tmp_path)


def test_safetensors_lone_surrogate_name(tmp_path: Path) -> None:
    header = '{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = _safetensors(tmp_path / "surrogate.safetensors", header, b"\0" * 4)
    assert "not valid Unicode" in assert_refused(path, tmp_path)


def test_deeply_nested_json(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    header = '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":' + deep + "}"
    path = _safetensors(tmp_path / "deep.safetensors", header, b"\0" * 4)
    assert_refused(path, tmp_path)
    save_file({"a": torch.ones(1)}, str(tmp_path / "shard.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "shard.safetensors"}, "metadata": ' + deep + "}")
    assert_refused(index, tmp_path, reference_refuses=None)


def test_index_shard_name_too_long(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "x" * 300 + ".safetensors"}}))
    message = assert_refused(index, tmp_path, reference_refuses=None)
    assert "is not a usable file name" in message


# -- pickles: torch's opcodes and checks, bounded work ------------------------------------------


def test_ordered_dict_build_cannot_shadow_items(tmp_path: Path) -> None:
    """BUILD on an OrderedDict sets attributes in torch; one named `items` must neither hide the
    tensors nor raise outside the guarded region."""
    data = {"0": np.arange(4, dtype=np.float32).tobytes()}
    for name, value in (("class", c.glob("collections", "OrderedDict")), ("int", c.integer(5))):
        pkl = (
            c.PROTO
            + c.glob("collections", "OrderedDict")
            + c.EMPTY_TUPLE
            + c.REDUCE
            + c.MARK
            + c.uni("a")
            + c.tensor("0")
            + c.SETITEMS
            + c.EMPTY_DICT
            + c.uni("items")
            + value
            + c.SETITEM
            + c.BUILD
            + c.STOP
        )
        assert_reads_as_torch(c.torch_zip(tmp_path / f"build-{name}.pt", pkl, data))


def test_opcodes_torch_refuses_are_refused(tmp_path: Path) -> None:
    data = {"0": np.arange(4, dtype=np.float32).tobytes()}
    for name, pkl in {
        "proto4-frame.pt": b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00}.",
        "requires-grad-int.pt": c.state_dict(
            {"a": c.tensor("0", storage="LongStorage", numel=2).replace(c.NEWFALSE, b"\x88")}
        ),
        "untyped-storage-v2.pt": c.state_dict({"a": c.tensor("0", storage="TypedStorage")}),
    }.items():
        assert_refused(c.torch_zip(tmp_path / name, pkl, data), tmp_path)


def test_pickle_bombs_in_a_subprocess(tmp_path: Path) -> None:
    """Crafted pickles that crashed (SIGSEGV), hung, or took 500 MB: each is refused in bounded
    time and memory, in a subprocess (so a crash cannot take the test run with it)."""
    data = {"0": np.arange(4, dtype=np.float32).tobytes()}
    level = c.put(0) + c.get(0) + c.TUPLE2  # t -> (t, t)
    list_dag = (
        c.EMPTY_LIST
        + c.put(0)
        + b"".join(
            c.EMPTY_LIST + c.MARK + c.get(i) + c.get(i) + c.APPENDS + c.put(i + 1)
            for i in range(40)
        )
    )
    bombs = {
        "deep-tuple-key.pt": c.PROTO
        + c.EMPTY_DICT
        + c.EMPTY_TUPLE
        + c.TUPLE1 * 300_000
        + c.integer(1)
        + c.SETITEM
        + c.STOP,
        "tuple-dag-key.pt": c.PROTO
        + c.EMPTY_DICT
        + c.EMPTY_TUPLE
        + level * 59
        + c.integer(1)
        + c.SETITEM
        + c.STOP,
        "list-dag-pid.pt": c.PROTO + list_dag + c.BINPERSID + c.STOP,
        "list-dag-size.pt": c.PROTO
        + list_dag
        + c.EMPTY_DICT
        + c.MARK
        + c.uni("a")
        + c.tensor(size=c.get(40))
        + c.SETITEMS
        + c.STOP,
        "list-dag-pid-tuple.pt": c.PROTO
        + c.MARK
        + c.uni("storage")
        + list_dag
        + c.TUPLE
        + c.BINPERSID
        + c.STOP,
        "memo-2-25.pt": c.PROTO + c.EMPTY_DICT + c.put(2**25) + c.STOP,  # valid: an empty dict
    }
    paths = [str(c.torch_zip(tmp_path / name, pkl, data)) for name, pkl in bombs.items()]
    child = Path(__file__).with_name("_bomb_child.py")
    done = subprocess.run(
        [sys.executable, str(child), *paths], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for path, (kind, names_file, seconds, rss_mb) in zip(paths, results):
        expected = "read" if path.endswith("memo-2-25.pt") else "CheckpointError"
        assert kind == expected and names_file, (path, kind)
        assert seconds < 5, (path, seconds)
        assert rss_mb < 64, (path, rss_mb)
