"""An NNX model's training state saved, the process gone, restored in a fresh process into an
abstract model (no random initialisation): identical state, and training continues bit for
bit as if never interrupted (dropout included: each step's keys come from the state)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

CHILD = Path(__file__).with_name("_resume_child.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(directory: Path, phase: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, str(CHILD), str(directory), phase],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_nnx_checkpoint_survives_a_restart_and_resumes_bit_identically(tmp_path: Path) -> None:
    _run(tmp_path, "first")
    _run(tmp_path, "second")
    saved, restored = np.load(tmp_path / "saved.npz"), np.load(tmp_path / "restored.npz")
    assert sorted(saved.files) == sorted(restored.files)
    for key in saved.files:
        np.testing.assert_array_equal(restored[key], saved[key], err_msg=key)
    expected, resumed = np.load(tmp_path / "uninterrupted.npz"), np.load(tmp_path / "resumed.npz")
    assert int(expected["step"]) == 5
    for key in expected.files:
        np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)
