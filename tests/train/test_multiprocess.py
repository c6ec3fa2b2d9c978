"""Two processes on a loopback coordinator (`jax.distributed`, 2 CPU devices each, one
4-device mesh): conversion from a PyTorch file (each process reading its own slices), 3 fully
sharded steps, a checkpoint, a fresh two-process run that restores it and takes 2 more steps:
equal to one process running all 5 steps, and to PyTorch. When one process dies the test
stops the other and fails, within a bounded time, instead of hanging."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import flax_registry as fr
from flax_registry import train
from flax_registry.io import save_safetensors

from ..parity import TOL
from . import torch_runs
from .models import Net, TorchNet, batches, cross_entropy, torch_variables

ROOT = Path(__file__).resolve().parents[2]
PHASE_TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def run_processes(phase: str, workdir: Path, timeout: float = PHASE_TIMEOUT) -> list[str]:
    """Both processes of `phase`; their stdouts. Raises (after stopping every process) as
    soon as one fails, or when `timeout` seconds pass. Output goes to files, so that a chatty
    process never blocks on a full pipe."""
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env.pop("XLA_FLAGS", None)
    logs = [(workdir / f"{phase}.{i}.out", workdir / f"{phase}.{i}.err") for i in range(2)]
    children = []
    try:
        for i, (out, err) in enumerate(logs):
            with out.open("w") as stdout, err.open("w") as stderr:
                children.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "tests.train._multiprocess_child", phase, str(i),
                         str(port), str(workdir)],
                        cwd=ROOT,
                        env=env,
                        stdout=stdout,
                        stderr=stderr,
                        start_new_session=True,  # its own process group, stopped whole
                    )
                )  # fmt: skip
        deadline = time.monotonic() + timeout
        while None in [c.poll() for c in children]:  # every one polled, each time
            failed = [c for c in children if c.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                why = f"process exited with {failed[0].returncode}" if failed else "timed out"
                raise RuntimeError(f"{phase}: {why}\n" + _tails(children, logs))
            time.sleep(0.2)
        if any(c.returncode for c in children):
            raise RuntimeError(f"{phase}: a process failed\n" + _tails(children, logs))
        return [out.read_text() for out, _ in logs]
    finally:
        _stop(children)


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for c in children:
        if c.poll() is None:
            os.killpg(c.pid, signal.SIGKILL)
        c.wait(timeout=30)


def _tails(children: list[subprocess.Popen[bytes]], logs: list[tuple[Path, Path]]) -> str:
    _stop(children)
    return "\n".join(
        f"--- process {i} (exit {c.returncode}):\n{err.read_text()[-2000:]}"
        for i, (c, (_, err)) in enumerate(zip(children, logs))
    )


def test_two_processes_convert_train_checkpoint_and_resume(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TorchNet(channels=8, classes=4)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    save_safetensors({k: v.numpy() for k, v in initial.items()}, tmp_path / "init.safetensors")
    start = time.monotonic()
    assert all("FIRST OK" in out for out in run_processes("first", tmp_path))
    assert all("SECOND OK" in out for out in run_processes("second", tmp_path))
    elapsed = time.monotonic() - start
    final = dict(np.load(tmp_path / "final.npz"))
    assert int(final.pop("step")) == 5
    # one process, all 5 steps, no checkpoint
    module = Net(channels=8, classes=4)
    state = train.create_train_state(
        module, torch_variables(module, net), train.torch_adamw(1e-2, weight_decay=0.1)
    )
    step = train.make_train_step(cross_entropy)
    data = batches(5, batch=8, seed=1)
    for batch in data:
        state, _ = step(state, batch)
    inner = state.opt_state.inner_states["default"].inner_state
    single = {f"param/{k}": v for k, v in fr.named_parameters(module, state.variables)}
    single.update({f"buffer/{k}": v for k, v in fr.named_buffers(module, state.variables)})
    for field in ("exp_avg", "exp_avg_sq"):
        moments = {**state.variables, "params": getattr(inner, field)}
        single.update({f"{field}/{k}": v for k, v in fr.named_parameters(module, moments)})
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # noqa: E731
    theirs = torch_runs.train(initial, data, adamw)[-1]
    theirs.pop("loss")
    assert set(final) == set(single) == set(theirs)
    for key, value in final.items():
        np.testing.assert_allclose(value, np.asarray(single[key]), **TOL, err_msg=key)
        np.testing.assert_allclose(value, theirs[key], **TOL, err_msg=f"torch {key}")
    assert elapsed < 2 * PHASE_TIMEOUT
    assert jax.device_count() == 1  # this process was never part of it


def test_a_dying_process_fails_the_run_instead_of_hanging(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"die: process exited with 3"):
        run_processes("die", tmp_path, timeout=60)
    assert time.monotonic() - start < 60  # noticed at once, not at the timeout
