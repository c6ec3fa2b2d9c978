"""Fuzzing the readers with mutants of real torch.save and safetensors files.

_fuzz_worker.py runs in a subprocess (so that a crash, a hang or a memory blow-up fails this
test instead of killing the run), one per format (so that pytest-xdist can run the two on
different workers), with hypothesis derandomized: every run checks the same mutants. For each
mutant, flax_registry returns exactly what torch / safetensors read from it, or raises
CheckpointError naming the file, and the CLI exits 2 with one line naming the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_PER_FORMAT = 2000  # to go deeper: FUZZ_SEED=1 python tests/io/_fuzz_worker.py DIR 50000


@pytest.mark.parametrize("file_format", ["torch", "safetensors"])
def test_mutated_checkpoints_read_as_the_reference_or_are_refused(
    tmp_path: Path, file_format: str
) -> None:
    worker = Path(__file__).with_name("_fuzz_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "FUZZ_SEED"}
    done = subprocess.run(
        [sys.executable, str(worker), str(tmp_path), str(EXAMPLES_PER_FORMAT), file_format],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-6000:])
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    outcomes = summary["outcomes"]
    assert summary["examples"] >= EXAMPLES_PER_FORMAT
    assert outcomes.get("read, equal to the reference", 0) > 100  # mutants that still load
    assert outcomes.get("refused", 0) > 100
    assert summary["peak_rss_growth_mb"] < 256
