"""Checkpoints: identical round trips, bit-identical resume, atomic steps under SIGKILL,
retention, clear errors, plain-orbax readability and restore onto an 8-device mesh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint import checkpoint_managers as policies

import flax_registry as fr
from flax_registry import train
from flax_registry.checkpoint import CheckpointManager

from .models import Linear, Net, TorchNet, batches, cross_entropy, torch_variables

ROOT = Path(__file__).resolve().parents[2]
TX = lambda: train.torch_adamw(1e-2, weight_decay=0.1)  # noqa: E731
GROUPS = lambda: [train.ParamGroup(["*.bias"], train.torch_adamw(1e-2, weight_decay=0.0))]  # noqa: E731


class DropNet(fr.Module):
    """Net behind input dropout: a resume must continue the dropout key sequence too."""

    def setup(self) -> None:
        self.net = Net()
        self.register_buffer("mask", jnp.ones(3), persistent=False)

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        x = x * self.mask[None, :, None, None]
        if train:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 0.8, x.shape)
            x = jnp.where(keep, x / 0.8, 0.0)
        return self.net(x, train=train)


def _fields(state: train.TrainState) -> Any:
    return (state.step, state.params, state.buffers, state.opt_state, state.rng)


def assert_identical(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _state(module: Any = None, **kw: Any) -> tuple[Any, train.TrainState]:
    module = module or Net()
    variables = torch_variables(module, TorchNet())
    return module, train.create_train_state(module, variables, TX(), param_groups=GROUPS(), **kw)


def _abstract(module: Any, **kw: Any) -> train.TrainState:
    return train.create_train_state(
        module, fr.abstract_variables(module), TX(), param_groups=GROUPS(), **kw
    )


_STEP = train.make_train_step(cross_entropy, donate=False)


def test_save_restore_gives_identical_trees(tmp_path: Path) -> None:
    module, state = _state(frozen=["conv1.*"], rng=3)
    for batch in batches(2):
        state, _ = _STEP(state, batch)
    with CheckpointManager(tmp_path, module) as manager:
        assert manager.save(2, state)
        manager.wait_until_finished()
        restored = manager.restore(_abstract(module, frozen=["conv1.*"]))
        assert_identical(_fields(restored), _fields(state))
        assert restored.frozen == state.frozen
        variables = manager.restore_variables()
        assert_identical(variables, state.variables)
        meta = manager.metadata()
    assert meta["flax_registry_version"] == fr.__version__ and meta["step"] == 2
    assert list(meta["keymap"]) == list(fr.state_dict(module, state.variables))
    assert meta["keymap"]["bn1.running_mean"] == ["buffers", ["bn1", "running_mean"]]
    assert meta["items"] == ["params", "buffers", "opt_state", "meta"]


def test_non_persistent_buffers_are_not_saved_and_come_back(tmp_path: Path) -> None:
    module = DropNet()
    variables = {**torch_variables(Net(), TorchNet())}
    variables = {
        "params": {"net": variables["params"]},
        "buffers": {"net": variables["buffers"], "mask": jnp.full(3, 5.0)},  # changed value
    }
    with CheckpointManager(tmp_path, module, enable_async=False) as manager:
        manager.save(1, variables)
        on_disk = manager.orbax_manager.item_metadata(1)["buffers"].tree["buffers"]
        assert "mask" not in on_disk and "net" in on_disk
        assert manager.metadata(1)["non_persistent"] == ["mask"]
        restored = manager.restore_variables(1)
    np.testing.assert_array_equal(restored["buffers"]["mask"], np.ones(3))  # its initial value
    assert_identical(restored["params"], variables["params"])
    assert_identical(restored["buffers"]["net"], variables["buffers"]["net"])


def test_resume_after_restart_is_bit_identical(tmp_path: Path) -> None:
    data = batches(4, seed=1)
    base = torch_variables(Net(), TorchNet())
    variables = {
        "params": {"net": base["params"]},
        "buffers": {"net": base["buffers"], "mask": jnp.ones(3)},
    }
    tx, groups = TX(), GROUPS()  # the same objects: one compiled step serves all three runs
    key = jax.random.key(11, impl="rbg")  # rbg compiles much faster than threefry on CPU
    create = lambda module, variables, rng: train.create_train_state(  # noqa: E731
        module, variables, tx, param_groups=groups, rng=rng
    )
    straight = create(DropNet(), variables, key)
    first = create(DropNet(), variables, key)
    for batch in data:
        straight, _ = _STEP(straight, batch)
    with CheckpointManager(tmp_path, DropNet()) as manager:
        for i, batch in enumerate(data[:2]):
            first, _ = _STEP(first, batch)
            manager.save(i + 1, first)
    del first, manager
    # "restart": new module, new manager, abstract target (its key is a placeholder)
    module = DropNet()
    with CheckpointManager(tmp_path, module) as manager:
        assert manager.latest_step() == 2
        resumed = manager.restore(create(module, fr.abstract_variables(module), key))
        with pytest.raises(ValueError, match="has a 'rbg' random key, the target a 'threefry2x32'"):
            manager.restore(create(module, fr.abstract_variables(module), 0))
    for batch in data[2:]:
        resumed, _ = _STEP(resumed, batch)
    assert_identical(_fields(resumed), _fields(straight))


def test_async_save_is_unaffected_by_donating_the_state(tmp_path: Path) -> None:
    module, state = _state()
    expected = jax.tree.map(np.array, _fields(state))
    step = train.make_train_step(cross_entropy)  # donates its input
    with CheckpointManager(tmp_path, module) as manager:
        manager.save(0, state)
        state, _ = step(state, batches(1)[0])
        manager.wait_until_finished()
        assert_identical(_fields(manager.restore(_abstract(module))), expected)


def test_kill_during_save_leaves_previous_step_restorable(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.train._kill_child", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline() if child.stdout else ""
        assert line.startswith("SAVING"), line + (child.stderr.read() if child.stderr else "")
        os.kill(child.pid, signal.SIGKILL)  # while the async save of step 2 is being written
    finally:
        child.kill()
        child.wait(timeout=30)
    assert any(".orbax-checkpoint-tmp" in p.name for p in tmp_path.iterdir()), list(
        tmp_path.iterdir()
    )
    from ._kill_child import Big, variables

    module = Big()
    with CheckpointManager(tmp_path, module, enable_async=False) as manager:
        assert manager.latest_step() == 1 and manager.all_steps() == [1]
        restored = manager.restore_variables()
        assert_identical(restored, variables(module, 1.0))
        assert manager.save(2, variables(module, 3.0))  # the stale tmp folder does not block
        assert manager.all_steps() == [1, 2]
        assert_identical(manager.restore_variables(2), variables(module, 3.0))


def test_retention_and_save_interval(tmp_path: Path) -> None:
    module, state = _state()
    variables = state.variables
    with CheckpointManager(tmp_path / "a", module, max_to_keep=2, enable_async=False) as m:
        for i in range(1, 6):
            m.save(i, variables)
        assert m.all_steps() == [4, 5]
    with CheckpointManager(tmp_path / "b", module, save_interval_steps=3, max_to_keep=None) as m:
        saved = [i for i in range(1, 10) if m.save(i, variables)]
        m.wait_until_finished()
        assert saved == [3, 6, 9] and m.all_steps() == [3, 6, 9]
    policy = policies.AnyPreservationPolicy([policies.LatestN(1), policies.EveryNSteps(4)])
    with CheckpointManager(tmp_path / "c", module, preservation_policy=policy) as m:
        for i in range(1, 10):
            m.save(i, variables)
        m.wait_until_finished()
        assert m.all_steps() == [4, 8, 9]


def test_missing_item_or_step_raises_naming_it(tmp_path: Path) -> None:
    module, state = _state()
    with CheckpointManager(tmp_path, module, enable_async=False) as manager:
        with pytest.raises(FileNotFoundError, match="no checkpoint to restore in"):
            manager.restore_variables()
        manager.save(1, state.variables)  # variables: no optimizer state
        with pytest.raises(KeyError, match="has no item 'opt_state'.*restore_variables()"):
            manager.restore(_abstract(module))
        with pytest.raises(FileNotFoundError, match=r"step 7 does not exist .*\[1\]"):
            manager.restore_variables(7)


class Wider(Net):
    """Net with an extra parameter."""

    def setup(self) -> None:
        super().setup()
        self.extra = Linear(2, 2)


def test_mismatched_item_raises_naming_the_keys(tmp_path: Path) -> None:
    module, state = _state()
    with CheckpointManager(tmp_path, module, enable_async=False) as manager:
        manager.save(1, state)
    with CheckpointManager(tmp_path, Net(channels=5)) as other, pytest.raises(ValueError) as info:
        other.restore_variables()
    message = str(info.value)
    assert "restoring item 'params' of checkpoint step 1" in message
    assert (
        "size mismatch for conv1.weight: copying a param with shape (4, 3, 3, 3) from "
        "checkpoint, the shape in current model is (5, 3, 3, 3)." in message
    )
    assert "written by Net (flax_registry" in message
    with (
        CheckpointManager(tmp_path, Wider()) as wider,
        pytest.raises(
            ValueError, match='Missing key\\(s\\) in checkpoint: "extra.weight", "extra.bias"'
        ),
    ):
        wider.restore_variables()
    # optimizer state built for other groups: named after the parameter it belongs to
    other = train.create_train_state(module, fr.abstract_variables(module), TX())
    with (
        CheckpointManager(tmp_path, module) as again,
        pytest.raises(ValueError, match="restoring item 'opt_state'"),
    ):
        again.restore(other)


def test_plain_orbax_reads_it_and_restores_onto_8_devices(tmp_path: Path) -> None:
    module = Net(channels=8, classes=4)
    from .models import TorchNet as T

    state = train.create_train_state(module, torch_variables(module, T(8, 4)), train.torch_adamw())
    state, _ = train.make_train_step(cross_entropy)(state, batches(1)[0])
    with CheckpointManager(tmp_path / "ckpt", module) as manager:
        manager.save(1, state)
    expected = {
        f"torch/{k}": np.asarray(v) for k, v in fr.named_parameters(module, state.variables)
    }
    expected.update(
        {f"torch/{k}": np.asarray(v) for k, v in fr.named_buffers(module, state.variables)}
    )
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        expected["params/" + "/".join(p.key for p in path)] = np.asarray(leaf)  # type: ignore[attr-defined]
    mu = state.opt_state.inner_states["default"].inner_state.exp_avg["conv2"]["weight"]
    expected["exp_avg/conv2.weight"] = np.asarray(mu)
    np.savez(tmp_path / "expected.npz", **expected)
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.train._mesh_child",
            str(tmp_path / "ckpt"),
            str(tmp_path / "expected.npz"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "MESH OK" in result.stdout, result.stderr[-3000:]
    assert ocp  # the child uses plain orbax first
