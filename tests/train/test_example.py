"""examples/train_resnet.py: trains, checkpoints, resumes after a restart, exports to PyTorch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_resnet.py"


def test_example_trains_resumes_and_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("train_resnet", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules["train_resnet"] = example  # dataclasses look their module up there
    spec.loader.exec_module(example)
    args = ["--ckpt-dir", str(tmp_path), "--steps-per-epoch", "2", "--batch-size", "8",
            "--image-size", "8", "--save-every", "1"]  # fmt: skip
    example.main([*args, "--epochs", "1"])
    assert "new run" in capsys.readouterr().out
    diff = example.main([*args, "--epochs", "2"])  # a restart: resumes at step 2
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out and "epoch 2:" in out
    assert diff is not None and diff < 1e-4  # the safetensors export runs in PyTorch
    assert (tmp_path / "model.safetensors").exists()
