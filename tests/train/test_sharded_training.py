"""Training on 8 simulated CPU devices equals one device and PyTorch: data-parallel and fully
sharded runs equal the single-device run and PyTorch's full-batch run step for step (params,
buffers, Adam's moments), every array keeps its requested NamedSharding, fully sharded state
costs each device about 1/8 of it, and per-replica BatchNorm equals PyTorch's DDP math (each
replica's forward and backward on its own part, gradients averaged, rank 0's buffers), with
gradient accumulation too (each replica accumulating over its own micro-batches).

PyTorch runs here; the JAX runs in one subprocess (`_sharded_child.py`), since the device
count is fixed when jax starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from . import torch_runs
from .models import TorchNet, batches

ROOT = Path(__file__).resolve().parents[2]
STEPS, BATCH, REPLICAS = 5, 16, 4
RUNS = {"global": (1, 1), "ddp": (REPLICAS, 1), "ddp_accum": (REPLICAS, 2)}


def test_sharded_training_equals_one_device_and_pytorch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    initial = TorchNet(channels=8, classes=4).state_dict()
    expected = {f"init/{k}": v.numpy().copy() for k, v in initial.items()}
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # noqa: E731
    data = batches(STEPS, batch=BATCH, seed=1)
    for run, (replicas, micro) in RUNS.items():
        records = torch_runs.train(initial, data, adamw, replicas=replicas, micro_batches=micro)
        for i, record in enumerate(records):
            expected.update({f"{run}/{i}/{k}": v for k, v in record.items()})
    np.savez(tmp_path / "expected.npz", **expected)
    env = {
        **os.environ,
        "JAX_NUM_CPU_DEVICES": "8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "tests.train._sharded_child", str(tmp_path / "expected.npz")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "SHARDED OK" in result.stdout, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-2])
    for run in ("data_parallel", "fully_sharded"):
        assert report[run]["vs_single"] <= 1e-5 and report[run]["vs_torch"] <= 1e-5, report
    assert report["per_replica"]["vs_torch"] <= 1e-5, report
    assert report["per_replica_accumulated"]["vs_torch"] <= 1e-5, report
    fs, dp = report["fully_sharded"], report["data_parallel"]
    assert fs["max_device_bytes"] <= fs["total_bytes"] * (1 / 8 + 0.02), report
    assert dp["max_device_bytes"] == dp["total_bytes"], report  # replicated: all of it
