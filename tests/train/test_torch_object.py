"""flax_registry.io.load_torch_object: the whole object a torch.save file holds (a training
checkpoint's nested dicts, lists and numbers), tensors lazy and bit-exact, compared with
torch.load on files written by torch.save; what torch.load(weights_only=True) refuses, so
does it, before anything runs."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flax_registry.io import CheckpointError, ForbiddenGlobalError, LazyTensor, load_torch_object

from ..parity import to_numpy


def _same(ours: Any, theirs: Any, where: str = "") -> None:
    """`ours` (lazy tensors read) is `theirs` (torch.load's), bit for bit, types included."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, LazyTensor), where
        array = np.asarray(ours)
        expected = to_numpy(theirs)
        assert array.dtype == expected.dtype and array.shape == expected.shape, where
        assert array.tobytes() == np.ascontiguousarray(expected).tobytes(), where
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs), where
        for k in theirs:
            _same(ours[k], theirs[k], f"{where}.{k}")
    elif isinstance(theirs, list | tuple):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _same(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs and type(ours) is type(theirs), where


def test_a_training_checkpoint_loads_as_saved(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), amsgrad=True)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 5, 5])  # a Counter
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    saved = {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng_state": torch.get_rng_state(),
        "views": [base[1:3, ::2], base.t(), base[0]],  # one storage, strided views
        "bf16": torch.randn(3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
        "meta": {"epoch": 3, "best": 0.25, "name": "run", "none": None, "flag": True,
                 "shape": torch.Size([2, 3]), "tags": {"a", "b"}, "raw": b"\x00\xff",
                 "pair": (1, 2.5), "z": 1 + 2j},
    }  # fmt: skip
    torch.save(saved, tmp_path / "ckpt.pt")
    expected = torch.load(tmp_path / "ckpt.pt")
    expected["meta"]["shape"] = tuple(expected["meta"]["shape"])  # torch.Size reads as a tuple
    with load_torch_object(tmp_path / "ckpt.pt") as obj:
        assert isinstance(obj.obj["scheduler"]["milestones"], collections.Counter)
        assert obj.obj["optimizer"]["state"][0]["exp_avg"].key == "optimizer.state.0.exp_avg"
        _same(obj.obj, expected)
        part = obj.obj["views"][1][1:3, 2]  # a slice of a lazy tensor
        np.testing.assert_array_equal(part, base.t()[1:3, 2].numpy())
    with pytest.raises(CheckpointError, match="the checkpoint reader is closed"):
        obj.obj["rng_state"].read()


def test_what_weights_only_refuses_is_refused_before_it_runs(tmp_path: Path) -> None:
    torch.save({"rng": np.random.get_state()}, tmp_path / "numpy.pt")
    with pytest.raises(torch.serialization.pickle.UnpicklingError):
        torch.load(tmp_path / "numpy.pt")  # weights_only=True, PyTorch's default
    with pytest.raises(ForbiddenGlobalError, match=r"global `numpy\.") as info:
        load_torch_object(tmp_path / "numpy.pt")
    assert info.value.global_name.startswith("numpy.")
    torch.save({"x": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        load_torch_object(tmp_path / "legacy.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_torch_object(tmp_path / "missing.pt")
