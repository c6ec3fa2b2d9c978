"""The examples run from a fresh checkout and check themselves against PyTorch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_parameter_vs_buffer_agrees_with_torch():
    out = run("parameter_vs_buffer.py")
    assert "names and shapes agree with PyTorch: yes" in out
    # (a) plain attributes are absent from both listings, (c) buffers are saved, not learned.
    plain, params, buffers = out.split("\n(")[1:4]
    assert "weight (10, 10)" not in plain
    assert params.count("weight (10, 10)") == 6  # two listings, three columns
    assert buffers.split("state_dict()")[0].count("weight (10, 10)") == 0
    assert buffers.split("state_dict()")[1].count("weight (10, 10)") == 3
    assert "    linen" in out and "nnx" in out and "torch" in out


def test_port_a_torch_model_agrees_with_torch():
    out = run("port_a_torch_model.py")
    assert "agrees with PyTorch (rtol = atol = 1e-5): yes" in out
