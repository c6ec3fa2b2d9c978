"""examples/resume_from_pytorch.py: PyTorch -> flax_registry -> PyTorch, three runs agreeing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "resume_from_pytorch.py"


def test_resume_from_pytorch_example_agrees_and_plots(tmp_path: Path) -> None:
    plot = tmp_path / "curves.png"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--plot", str(plot), "--ckpt-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "the three runs agree (1e-4): yes" in out
    assert "'scaler': GradScaler state" in out and "'rng_state': tensor uint8" in out
    table = [line for line in out.splitlines() if "(from JAX ckpt)" in line]
    assert table and all(float(line.split()[-1]) < 1e-4 for line in table)
    assert (tmp_path / "from_pytorch.pt").exists() and (tmp_path / "from_jax.pt").exists()
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in out
