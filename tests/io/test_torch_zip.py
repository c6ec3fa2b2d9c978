"""Reading torch.save zip checkpoints without torch, checked against torch.load(weights_only=True)."""

from __future__ import annotations

import builtins
import collections
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flax_registry.io import CheckpointError, ForbiddenGlobalError, open_checkpoint
from tests.io._samples import sample


def assert_same(arr: np.ndarray, t: torch.Tensor) -> None:
    """Same shape, same dtype name, same bytes (bit-identical, also for bf16/fp8/bool)."""
    assert isinstance(arr, np.ndarray)
    assert arr.shape == tuple(t.shape)
    assert str(arr.dtype) == str(t.dtype).removeprefix("torch.")
    got = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    want = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    np.testing.assert_array_equal(got, want)


def assert_matches_torch(path: Path, entry: str | None = None) -> None:
    expected = torch.load(path, weights_only=True)
    if entry is not None:
        for part in entry.split("."):
            expected = expected[part]
    with open_checkpoint(path, entry=entry) as reader:
        assert list(reader) == list(expected)
        for key, t in expected.items():
            assert reader.shape(key) == tuple(t.shape)
            assert reader.nbytes(key) == t.numel() * t.element_size()
            assert_same(reader.read(key), t)
            assert_same(np.asarray(reader[key]), t)


def rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes | None]) -> None:
    """Copy a torch zip, replacing (bytes) or dropping (None) the entries named by suffix."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            match = [k for k in replace if info.filename.endswith(k)]
            data = replace[match[0]] if match else zin.read(info)
            if data is not None:
                zout.writestr(info.filename, data)


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
    torch.bool,
    torch.complex64,
    torch.uint16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_dtypes_scalars_and_empty_match_torch(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = {
        "matrix": sample(dtype, (3, 5), 0),
        "scalar": sample(dtype, (), 1),
        "empty": sample(dtype, (0, 4), 2),
        "vector": sample(dtype, (7,), 3),
    }
    torch.save(sd, tmp_path / "w.pt")
    assert_matches_torch(tmp_path / "w.pt")


def test_non_contiguous_and_shared_storage(tmp_path: Path) -> None:
    base = torch.randn(6, 8)
    half = torch.randn(4, 6).to(torch.bfloat16)
    sd = {
        "base": base,
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "row": base[3],
        "narrow": base.narrow(1, 2, 4),
        "expanded": torch.arange(3.0).expand(4, 3),
        "bf16_t": half.t(),
        "bf16_col": half[:, 2],
        "view": base.view(4, 12),
    }
    torch.save(sd, tmp_path / "views.pt")
    assert_matches_torch(tmp_path / "views.pt")
    with zipfile.ZipFile(tmp_path / "views.pt") as z:  # the views really share storages
        assert len([n for n in z.namelist() if "/data/" in n]) == 3


def test_read_slice_of_strided_tensor(tmp_path: Path) -> None:
    base = torch.randn(10, 12)
    torch.save({"t": base.t()[2:9]}, tmp_path / "s.pt")
    expected = base.t()[2:9].numpy()
    with open_checkpoint(tmp_path / "s.pt") as reader:
        for index in [(slice(1, 4),), (slice(None), slice(2, 9, 3)), (3,), (Ellipsis, -1)]:
            np.testing.assert_array_equal(reader.read_slice("t", index), expected[index])
        np.testing.assert_array_equal(reader["t"][1:3, ::2], expected[1:3, ::2])


def test_batchnorm_model_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 2),
    )
    model.train()
    model(torch.randn(2, 3, 4, 4))  # update the running statistics
    model.half()
    model[1].float()  # mixed dtypes, as in AMP checkpoints
    torch.save(model.state_dict(), tmp_path / "model.pth")
    assert_matches_torch(tmp_path / "model.pth")
    with open_checkpoint(tmp_path / "model.pth") as reader:
        assert reader.dtype("1.num_batches_tracked") == np.int64
        assert reader.dtype("0.weight") == np.float16


def test_parameters_are_read_as_their_data(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.randn(3, 2))
    torch.save(
        {"p": p, "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False)},
        tmp_path / "p.pt",
    )
    assert_matches_torch(tmp_path / "p.pt")


def _training_checkpoint() -> dict[str, object]:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}


def test_nested_checkpoint_needs_entry(tmp_path: Path) -> None:
    torch.save(_training_checkpoint(), tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"ckpt\.pt") as info:
        open_checkpoint(tmp_path / "ckpt.pt")
    message = str(info.value)
    assert "'state_dict' (dict of 2 tensors)" in message
    assert "'epoch' (int)" in message
    assert "entry='state_dict'" in message
    assert_matches_torch(tmp_path / "ckpt.pt", entry="state_dict")


def test_dotted_entry_and_bad_entry(tmp_path: Path) -> None:
    torch.save({"model": _training_checkpoint(), "step.count": 1}, tmp_path / "deep.pt")
    assert_matches_torch(tmp_path / "deep.pt", entry="model.state_dict")
    with pytest.raises(CheckpointError, match=r"deep\.pt.*no key 'statedict'.*'state_dict'"):
        open_checkpoint(tmp_path / "deep.pt", entry="model.statedict")
    with pytest.raises(
        CheckpointError,
        match=r"entry='model.optimizer' maps 'state' to dict of 2 entries, 0 tensors",
    ):
        open_checkpoint(tmp_path / "deep.pt", entry="model.optimizer")
    with pytest.raises(
        CheckpointError, match=r"deep\.pt: the checkpoint holds int at entry='step.count'"
    ):
        open_checkpoint(tmp_path / "deep.pt", entry="step.count")


def test_single_tensor_is_not_a_state_dict(tmp_path: Path) -> None:
    torch.save(torch.ones(3), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"t\.pt: the checkpoint holds tensor float32 \(3,\)"):
        open_checkpoint(tmp_path / "t.pt")


# -- malicious pickles ---------------------------------------------------------------------------


class _RunsCommand:
    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return self.func, (self.arg,)


def _malicious_zip(path: Path, payload: object) -> None:
    """A zip shaped like a torch checkpoint whose data.pkl runs ``payload`` when unpickled."""
    data = pickle.dumps({"weight": payload}, protocol=2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize(
    ("func", "make_arg", "name"),
    [
        (os.system, lambda m: f"touch {m}", f"{os.system.__module__}.system"),
        (builtins.exec, lambda m: f"open({str(m)!r}, 'w').close()", "builtins.exec"),
    ],
    ids=["os.system", "builtins.exec"],
)
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, func, make_arg, name) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _malicious_zip(path, _RunsCommand(func, make_arg(marker)))
    with pytest.raises(
        ForbiddenGlobalError, match=rf"evil\.pt.*`{re.escape(name)}`.*Nothing"
    ) as info:
        open_checkpoint(path)
    assert info.value.global_name == name
    assert "malicious" in str(info.value)
    assert not marker.exists()


def test_build_cannot_modify_shared_stand_ins(tmp_path: Path) -> None:
    """BUILD on an allowed global (here torch.FloatStorage) must not alter it for later loads."""
    # GLOBAL 'torch FloatStorage'; state (None, {'dtype': 'x'}); BUILD (= setattr); STOP
    data = b"\x80\x02ctorch\nFloatStorage\nN}(X\x05\x00\x00\x00dtypeX\x01\x00\x00\x00xu\x86b."
    path = tmp_path / "build.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)
    with pytest.raises(CheckpointError, match=r"build\.pt: could not unpickle.*AttributeError"):
        open_checkpoint(path)
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.pt")
    assert_matches_torch(tmp_path / "ok.pt")


# -- damaged files -------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "good.pt"
    torch.save({"a": torch.randn(64, 16), "b": torch.arange(10)}, path)
    return path


def test_truncated_zip(saved: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.pt"
    cut.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a valid zip archive.*truncated"):
        open_checkpoint(cut)


def test_not_a_zip_with_torch_extension(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(b"\x01\x02not a checkpoint at all" * 4)
    with pytest.raises(CheckpointError, match=r"noise\.bin: not a valid zip archive"):
        open_checkpoint(path)


def test_corrupted_pickle_fails_crc(saved: Path, tmp_path: Path) -> None:
    raw = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    raw[info.header_offset + 30 + len(info.filename) + 40] ^= 0xFF
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(
        CheckpointError, match=r"flipped\.pt: archive entry '.*data\.pkl' is corrupted"
    ):
        open_checkpoint(bad)


def test_corrupted_storage_fails_crc_on_read(saved: Path, tmp_path: Path) -> None:
    raw = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    with open(saved, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = np.frombuffer(f.read(4), dtype="<u2")
    raw[info.header_offset + 30 + int(n) + int(m) + 100] ^= 0xFF
    bad = tmp_path / "bitrot.pt"
    bad.write_bytes(bytes(raw))
    with open_checkpoint(bad) as reader:
        with pytest.raises(CheckpointError, match=r"bitrot\.pt: .*data/0' is corrupted: CRC-32"):
            reader.read("a")
        assert_same(reader.read("b"), torch.arange(10))


def test_missing_and_short_storage(saved: Path, tmp_path: Path) -> None:
    rewrite_zip(saved, tmp_path / "missing.pt", {"data/1": None})
    with pytest.raises(CheckpointError, match=r"missing\.pt: data\.pkl refers to storage '1'"):
        open_checkpoint(tmp_path / "missing.pt")
    rewrite_zip(saved, tmp_path / "short.pt", {"data/0": b"\x00" * 64})
    with pytest.raises(CheckpointError, match=r"short\.pt: .*reach byte 4096.*holds 64 bytes"):
        open_checkpoint(tmp_path / "short.pt")


def test_big_endian_archive(tmp_path: Path) -> None:
    sd = {
        k: sample(d, (3, 4), i)
        for i, (k, d) in enumerate(
            [
                ("f", torch.float32),
                ("h", torch.bfloat16),
                ("i", torch.int64),
                ("c", torch.complex64),
            ]
        )
    }
    torch.save(sd, tmp_path / "le.pt")
    swapped: dict[str, bytes | None] = {"byteorder": b"big"}
    with zipfile.ZipFile(tmp_path / "le.pt") as z:
        for i, t in enumerate(sd.values()):  # storages are numbered in pickling order
            size = t.element_size() // (2 if t.is_complex() else 1)
            raw = np.frombuffer(z.read(f"le/data/{i}"), dtype=f"<u{size}")
            swapped[f"data/{i}"] = raw.astype(f">u{size}").tobytes()
    rewrite_zip(tmp_path / "le.pt", tmp_path / "be.pt", swapped)
    assert_matches_torch(tmp_path / "be.pt")  # torch.load byteswaps too


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_legacy_and_torchscript_formats(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(
        CheckpointError, match=r"old\.pt: this is a legacy .*not supported.*safetensors"
    ):
        open_checkpoint(tmp_path / "old.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(CheckpointError, match=r"scripted\.pt: this is a TorchScript archive"):
        open_checkpoint(tmp_path / "scripted.pt")


def test_deflated_archive_is_read_through_zipfile(saved: Path, tmp_path: Path) -> None:
    with (
        zipfile.ZipFile(saved) as zin,
        zipfile.ZipFile(tmp_path / "zipped.pt", "w", zipfile.ZIP_DEFLATED) as zout,
    ):
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    expected = torch.load(saved, weights_only=True)
    with open_checkpoint(tmp_path / "zipped.pt") as reader:
        for key, t in expected.items():
            assert_same(reader.read(key), t)
            np.testing.assert_array_equal(reader.read_slice(key, (slice(2, 5),)), t[2:5].numpy())


def test_dtype_without_numpy_equivalent(tmp_path: Path) -> None:
    packed = torch.zeros(2, 2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    torch.save({"ok": torch.ones(1), "fp4": packed}, tmp_path / "fp4.pt")
    with pytest.raises(
        CheckpointError, match=r"fp4\.pt: tensor 'fp4' has dtype torch\.float4_e2m1fn_x2"
    ):
        open_checkpoint(tmp_path / "fp4.pt")


def test_zip_without_data_pkl(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match=r"other\.pt: .*no '<name>/data\.pkl'.*readme\.txt"):
        open_checkpoint(tmp_path / "other.pt")


def test_ordered_dict_metadata_is_ignored(tmp_path: Path) -> None:
    sd = collections.OrderedDict(w=torch.ones(2))
    sd._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    torch.save(sd, tmp_path / "meta.pt")
    with open_checkpoint(tmp_path / "meta.pt") as reader:
        assert list(reader) == ["w"]
        assert reader.metadata == {}
