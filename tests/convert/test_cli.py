"""The `flax-registry` command line: inspect, convert, diff (checked against torch / orbax)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from safetensors.torch import load_file

from flax_registry.cli import main
from flax_registry.io import open_checkpoint
from tests.convert._helpers import assert_bit_identical, numpy_state


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "encoder.weight": torch.randn(6, 4, generator=g),
        "encoder.bias": torch.randn(6, generator=g).to(torch.bfloat16),
        "norm.running_mean": torch.randn(6, generator=g).to(torch.float16),
        "norm.num_batches_tracked": torch.tensor(12),
    }


@pytest.fixture
def pt_file(state: dict[str, torch.Tensor], tmp_path: Path) -> Path:
    torch.save(state, tmp_path / "model.pt")
    return tmp_path / "model.pt"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_lists_keys_shapes_dtypes_and_totals(
    pt_file: Path,
    state: dict[str, torch.Tensor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from flax_registry.io import save_safetensors

    save_safetensors(numpy_state(state), tmp_path / "sharded.safetensors", max_shard_size=40)
    for path in (pt_file, tmp_path / "sharded.safetensors.index.json"):
        code, out, _ = _run(["inspect", str(path)], capsys)
        assert code == 0
        for key, t in state.items():
            dtype = str(t.dtype).removeprefix("torch.").replace("int64", "int64")
            line = next(line for line in out.splitlines() if line.startswith(key + " "))
            assert str(tuple(t.shape)) in line and dtype in line
        elements = sum(t.numel() for t in state.values())
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        assert f"total: 4 tensors, {elements:,} elements, {nbytes} B" in out


def test_convert_to_safetensors_keeps_keys_order_and_bits(
    pt_file: Path,
    state: dict[str, torch.Tensor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dst = tmp_path / "out.safetensors"
    code, out, _ = _run(["convert", str(pt_file), str(dst)], capsys)
    assert code == 0 and "wrote 4 tensors" in out
    with open_checkpoint(dst) as reader:
        assert list(reader) == list(state)
    loaded = load_file(dst)
    assert_bit_identical({k: loaded[k] for k in state}, state)


def test_convert_sharded_and_cast(
    pt_file: Path,
    state: dict[str, torch.Tensor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dst = tmp_path / "model.safetensors"
    code, _, _ = _run(
        ["convert", str(pt_file), str(dst), "--max-shard-size", "50", "--dtype", "bfloat16"], capsys
    )
    assert code == 0
    with open_checkpoint(tmp_path / "model.safetensors.index.json") as reader:
        assert list(reader) == list(state)
        assert {str(reader.dtype(k)) for k in reader} == {"bfloat16", "int64"}
        expected = state["encoder.weight"].to(torch.bfloat16).view(torch.int16).numpy()
        np.testing.assert_array_equal(reader.read("encoder.weight").view(np.int16), expected)
        assert int(reader.read("norm.num_batches_tracked")) == 12


def test_convert_to_orbax(
    pt_file: Path,
    state: dict[str, torch.Tensor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dst = tmp_path / "orbax_ckpt"
    code, _, _ = _run(["convert", str(pt_file), str(dst), "--to", "orbax", "--no-progress"], capsys)
    assert code == 0
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(dst.absolute())
    assert_bit_identical({k: restored[k] for k in state}, state)
    code, _, err = _run(["convert", str(pt_file), str(dst), "--to", "orbax"], capsys)
    assert code == 2 and "already exists" in err


def test_diff(
    pt_file: Path,
    state: dict[str, torch.Tensor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = _run(["diff", str(pt_file), str(pt_file)], capsys)
    assert code == 0 and "4 common keys; checkpoints identical" in out
    other = dict(state)
    other["encoder.weight"] = state["encoder.weight"] + torch.linspace(0, 0.5, 24).reshape(6, 4)
    other["norm.running_mean"] = torch.zeros(7, dtype=torch.float16)
    del other["encoder.bias"]
    other["extra"] = torch.ones(2)
    torch.save(other, tmp_path / "other.pt")
    code, out, _ = _run(["diff", str(pt_file), str(tmp_path / "other.pt")], capsys)
    assert code == 1
    lines = out.splitlines()
    assert (
        lines[lines.index(next(x for x in lines if x.startswith("only in A"))) + 1].strip()
        == "encoder.bias"
    )
    assert (
        lines[lines.index(next(x for x in lines if x.startswith("only in B"))) + 1].strip()
        == "extra"
    )
    assert "shape differs" in next(x for x in lines if x.startswith("norm.running_mean"))
    expected = float(
        (other["encoder.weight"].double() - state["encoder.weight"].double()).abs().max()
    )
    row = next(x for x in lines if x.startswith("encoder.weight"))
    assert math.isclose(float(row.split()[-1]), expected, rel_tol=1e-5)


def test_bad_file_exits_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _, err = _run(["inspect", str(tmp_path / "broken.safetensors")], capsys)
    assert code == 2 and "broken.safetensors" in err
    code, _, err = _run(["inspect", str(tmp_path / "missing.pt")], capsys)
    assert code == 2 and "no such file" in err


def test_python_dash_m(pt_file: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flax_registry", "inspect", str(pt_file)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert "encoder.weight" in result.stdout and "total: 4 tensors" in result.stdout
