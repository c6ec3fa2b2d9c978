"""A PyTorch training run moves to flax_registry mid-way and back, through the usual
`torch.save({...})` checkpoint: SGD (momentum, nesterov, weight decay), Adam (amsgrad) and
AdamW with two parameter groups, one frozen parameter and a scheduler, on a model with
BatchNorm. 3 steps in PyTorch + 2 here equal PyTorch's uninterrupted 5 steps (parameters,
buffers, optimizer state) and 3 here + 2 in PyTorch likewise; other entries survive; loading
needs no torch."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as L

import flax_registry as fr
from flax_registry import train
from flax_registry.io import ForbiddenGlobalError

from ..parity import key
from .models import Net, TorchNet, batches, cross_entropy

TOL = 1e-5
NO_DECAY = ["*.bias", "bn*.weight"]  # the second parameter group
FROZEN = "conv1.weight"  # requires_grad_(False) in PyTorch
BATCHES = batches(5)
STEP = train.make_train_step(cross_entropy, donate=False)


def _warmup_cosine(opt: torch.optim.Optimizer) -> Any:
    return L.SequentialLR(
        opt, [L.LinearLR(opt, 0.1, total_iters=2), L.CosineAnnealingLR(opt, 8)], [2]
    )


WARMUP_COSINE = train.SequentialLR(
    [train.LinearLR(0.1, total_iters=2), train.CosineAnnealingLR(8)], [2]
)

# name: (torch optimizer over groups, torch scheduler, ours: (scheduler, weight decay) -> tx,
#        our scheduler, the first group's weight decay)
CASES: dict[str, tuple[Any, Any, Any, Any, float]] = {
    "sgd": (
        lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
        lambda o: L.StepLR(o, 2, gamma=0.5),
        lambda s, wd: train.torch_sgd(
            s.schedule(0.1), momentum=0.9, nesterov=True, weight_decay=wd
        ),
        train.StepLR(2, gamma=0.5),
        1e-2,
    ),
    "adam_amsgrad": (
        lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=1e-2, amsgrad=True),
        _warmup_cosine,
        lambda s, wd: train.torch_adam(s.schedule(1e-2), weight_decay=wd, amsgrad=True),
        WARMUP_COSINE,
        1e-2,
    ),
    "adamw": (
        lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1),
        lambda o: L.OneCycleLR(o, [1e-2, 1e-2], total_steps=10),  # cycles beta1 too
        lambda s, wd: train.torch_adamw(
            s.schedule(1e-2), betas=(s.momentum(), 0.999), weight_decay=wd
        ),
        train.OneCycleLR(total_steps=10),
        0.1,
    ),
}


def _torch_run(case: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    make_opt, make_sched, *_ = CASES[case]
    torch.manual_seed(0)
    net = TorchNet()
    net.get_parameter(FROZEN).requires_grad_(False)
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in trainable if n.endswith(".bias") or n.startswith("bn")]
    decay = [p for n, p in trainable if not (n.endswith(".bias") or n.startswith("bn"))]
    opt = make_opt([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    return net, opt, make_sched(opt)


def _torch_steps(net: torch.nn.Module, opt: Any, sched: Any, todo: list[Any]) -> None:
    net.train()
    for x, y in todo:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(torch.tensor(x)), torch.tensor(y).long())
        loss.backward()
        opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched.step()


def _ours(case: str) -> tuple[Any, list[train.ParamGroup]]:
    *_, make, schedule, decay = CASES[case]
    return make(schedule, decay), [train.ParamGroup(NO_DECAY, make(schedule, 0.0), name="no_decay")]


def _our_steps(state: Any, todo: list[Any]) -> Any:
    for x, y in todo:
        state, _ = STEP(state, (jnp.asarray(x), jnp.asarray(y)))
    return state


def _max_diff(ours: dict[str, Any], theirs: dict[str, Any]) -> float:
    assert list(ours) == list(theirs)
    return max(
        float(np.max(np.abs(np.asarray(ours[k], np.float64) - theirs[k].double().numpy())))
        for k in theirs
    )


def _assert_same_optimizer(
    ours: dict[str, Any], theirs: dict[str, Any], *, order: bool = True
) -> None:
    """Same state tensors (1e-5) and param_groups (keys in the same order when `order`: a
    group built by hand in PyTorch lists its own keys first)."""
    assert list(ours["state"]) == list(theirs["state"])  # the frozen index holds nothing
    for i, st in theirs["state"].items():
        assert list(ours["state"][i]) == list(st), i
        for k, v in st.items():
            np.testing.assert_allclose(ours["state"][i][k].numpy(), v.numpy(), rtol=TOL, atol=TOL)
    assert len(ours["param_groups"]) == len(theirs["param_groups"])
    for a, b in zip(ours["param_groups"], theirs["param_groups"]):
        assert list(a) == list(b) if order else sorted(a) == sorted(b)
        for k, v in b.items():  # lr, betas, momentum: float64 as PyTorch computes them
            assert a[k] == (pytest.approx(v, rel=1e-12) if isinstance(v, float | tuple) else v), k


def _save(net: Any, opt: Any, sched: Any, path: Path) -> None:
    torch.save(
        {
            "epoch": 1,
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng_state": torch.get_rng_state(),
            "scaler": torch.amp.GradScaler("cpu").state_dict(),
            "args": {"lr": 0.1, "milestones": torch.Size([3, 5]), "tags": {"bn", "sgd"}},
        },
        path,
    )


@pytest.mark.parametrize("case", list(CASES))
def test_three_steps_in_pytorch_then_two_here_equal_five_in_pytorch(
    case: str, tmp_path: Path
) -> None:
    net, opt, sched = _torch_run(case)
    _torch_steps(net, opt, sched, BATCHES[:3])
    _save(net, opt, sched, tmp_path / "ckpt.pt")
    _torch_steps(net, opt, sched, BATCHES[3:])  # PyTorch's uninterrupted 5 steps

    tx, groups = _ours(case)
    state, extras = train.from_torch_checkpoint(
        tmp_path / "ckpt.pt", Net(), tx, frozen=[FROZEN], param_groups=groups, rng=key(0)
    )
    assert int(state.step) == 3
    assert list(extras) == ["epoch", "rng_state", "scaler", "args"]  # kept, not dropped
    state = _our_steps(state, BATCHES[3:])

    exported = train.to_torch_checkpoint(state, tx, param_groups=groups, extras=extras)
    assert list(exported) == [
        "epoch",
        "model",
        "optimizer",
        "scheduler",
        "rng_state",
        "scaler",
        "args",
    ]
    assert _max_diff(exported["model"], net.state_dict()) <= TOL  # parameters and buffers
    _assert_same_optimizer(exported["optimizer"], opt.state_dict())
    assert exported["scheduler"]["last_epoch"] == sched.last_epoch == 5
    assert torch.equal(exported["rng_state"], torch.load(tmp_path / "ckpt.pt")["rng_state"])


@pytest.mark.parametrize("case", list(CASES))
def test_three_steps_here_then_two_in_pytorch_equal_five_in_pytorch(
    case: str, tmp_path: Path
) -> None:
    net, opt, sched = _torch_run(case)
    start = copy.deepcopy(net.state_dict())
    _torch_steps(net, opt, sched, BATCHES)  # PyTorch's uninterrupted 5 steps

    tx, groups = _ours(case)
    module = Net()
    variables, _ = fr.from_torch(module, start)
    state = train.create_train_state(
        module, variables, tx, frozen=[FROZEN], param_groups=groups, rng=key(0)
    )
    state = _our_steps(state, BATCHES[:3])
    torch.save(
        train.to_torch_checkpoint(state, tx, param_groups=groups, extras={"epoch": 1}),
        tmp_path / "x.pt",
    )

    ckpt = torch.load(tmp_path / "x.pt")  # weights_only=True: plain tensors and containers
    net2, opt2, sched2 = _torch_run(case)
    net2.load_state_dict(ckpt["model"], strict=True)
    sched2.load_state_dict(ckpt["scheduler"])
    opt2.load_state_dict(ckpt["optimizer"])
    _torch_steps(net2, opt2, sched2, BATCHES[3:])
    assert _max_diff(fr.to_torch(module, state.variables), start) > 1e-3  # it did train
    assert (
        max(float((net2.state_dict()[k] - v).abs().max()) for k, v in net.state_dict().items())
        <= TOL
    )
    _assert_same_optimizer(opt2.state_dict(), opt.state_dict(), order=False)
    assert sched2.last_epoch == sched.last_epoch and ckpt["epoch"] == 1


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import jax
import numpy as np
import flax_registry as fr
from flax_registry import train
from flax_registry.nn import BatchNorm2d, Conv2d, Linear

class Net(fr.Module):  # tests/train/models.py's Net (that file imports torch for its twin)
    def setup(self):
        self.conv1 = Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(4)
        self.conv2 = Conv2d(4, 4, 3, stride=2, padding=1)
        self.bn2 = BatchNorm2d(4)
        self.fc = Linear(4, 3)

    def __call__(self, x, *, train=False):
        x = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        x = self.bn2(jax.nn.relu(self.conv2(x)), train=train)
        return self.fc(x.mean(axis=(2, 3)))

tx = train.torch_sgd(train.StepLR(2, gamma=0.5).schedule(0.1), momentum=0.9, nesterov=True,
                     weight_decay=1e-2)
groups = [train.ParamGroup({no_decay!r}, train.torch_sgd(
    train.StepLR(2, gamma=0.5).schedule(0.1), momentum=0.9, nesterov=True, weight_decay=0.0))]
state, extras = train.from_torch_checkpoint({path!r}, Net(), tx, frozen=[{frozen!r}],
                                            param_groups=groups)
out = train.to_torch_checkpoint(state, tx, param_groups=groups, extras=extras, as_torch=False)
np.savez({out!r}, step=int(state.step), rng=extras["rng_state"],
         **{{"m." + k: v for k, v in out["model"].items()}},
         **{{f"o.{{i}}.{{k}}": v for i, s in out["optimizer"]["state"].items() for k, v in s.items()}})
print("torch" in sys.modules and sys.modules["torch"] is None)
"""


def test_loading_needs_no_torch(tmp_path: Path) -> None:
    net, opt, sched = _torch_run("sgd")
    _torch_steps(net, opt, sched, BATCHES[:3])
    _save(net, opt, sched, tmp_path / "ckpt.pt")
    code = _NO_TORCH.format(
        no_decay=NO_DECAY,
        path=str(tmp_path / "ckpt.pt"),
        frozen=FROZEN,
        out=str(tmp_path / "o.npz"),
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    got = np.load(tmp_path / "o.npz")
    assert int(got["step"]) == 3
    saved_rng = torch.load(tmp_path / "ckpt.pt")["rng_state"]
    np.testing.assert_array_equal(got["rng"], saved_rng.numpy())
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(got["m." + k], v.numpy(), err_msg=k)  # bit-exact
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            np.testing.assert_array_equal(got[f"o.{i}.{k}"], v.numpy())


def test_mismatched_checkpoints_raise_naming_the_entry(tmp_path: Path) -> None:
    net, opt, sched = _torch_run("sgd")
    _torch_steps(net, opt, sched, BATCHES[:1])
    tx, groups = _ours("sgd")
    module = Net()
    base = {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
    }
    with pytest.raises(ValueError, match=r"found no optimizer entry .*'model' \(state_dict of"):
        train.from_torch_checkpoint(
            {"model": base["model"]}, module, tx, frozen=[FROZEN], param_groups=groups
        )
    two = {**base, "ema": net.state_dict()}
    with pytest.raises(
        ValueError, match=r"several entries look like the model: \['model', 'ema'\]"
    ):
        train.from_torch_checkpoint(two, module, tx, frozen=[FROZEN], param_groups=groups)
    state, extras = train.from_torch_checkpoint(
        two, module, tx, frozen=[FROZEN], param_groups=groups, model_key="model"
    )
    assert list(extras) == ["ema"]
    assert f"'ema': state_dict of {len(net.state_dict())} tensors" in str(extras)
    no_sched = {k: v for k, v in base.items() if k != "scheduler"}
    with pytest.raises(
        ValueError, match=r"follow StepLR\(step_size=2, gamma=0.5\), but the checkpoint has no"
    ):
        train.from_torch_checkpoint(no_sched, module, tx, frozen=[FROZEN], param_groups=groups)
    constant = train.torch_sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    const_groups = [train.ParamGroup(NO_DECAY, train.torch_sgd(0.1, momentum=0.9, nesterov=True))]
    with pytest.raises(
        ValueError, match=r"'scheduler' is the state of a PyTorch StepLR, but every"
    ):
        train.from_torch_checkpoint(
            base, module, constant, frozen=[FROZEN], param_groups=const_groups
        )
    cosine = train.CosineAnnealingLR(2)
    with pytest.raises(
        ValueError, match=r"scheduler is StepLR .*follow CosineAnnealingLR\(T_max=2"
    ):
        train.from_torch_checkpoint(
            base, module, train.torch_sgd(cosine.schedule(0.1), momentum=0.9, nesterov=True, weight_decay=1e-2),
            frozen=[FROZEN],
            param_groups=[train.ParamGroup(NO_DECAY, train.torch_sgd(cosine.schedule(0.1), momentum=0.9, nesterov=True))],
        )  # fmt: skip
    torch.save({"model": net, "optimizer": base["optimizer"]}, tmp_path / "pickled_module.pt")
    with pytest.raises(ForbiddenGlobalError, match=r"TorchNet"):
        train.from_torch_checkpoint(tmp_path / "pickled_module.pt", module, tx)


def test_grad_scaler_state_continues_as_the_loss_scale(tmp_path: Path) -> None:
    """`loss_scale=True`: PyTorch's GradScaler state (after a skipped step and some growth)
    becomes the state's loss scale, and goes back into the checkpoint as PyTorch wrote it."""
    net, opt, sched = _torch_run("sgd")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    x, y = BATCHES[0]
    for poison in (True, False, False, False):  # one overflow, then growth
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(torch.tensor(x)), torch.tensor(y).long())
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
    torch.save(
        {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
         "scaler": scaler.state_dict()},
        tmp_path / "ckpt.pt",
    )  # fmt: skip
    tx, groups = _ours("sgd")
    state, extras = train.from_torch_checkpoint(
        tmp_path / "ckpt.pt",
        Net(),
        tx,
        frozen=[FROZEN],
        param_groups=groups,
        loss_scale=True,
    )
    assert "scaler" not in extras and state.loss_scale is not None
    assert state.loss_scale.state_dict() == scaler.state_dict()
    exported = train.to_torch_checkpoint(state, tx, param_groups=groups, extras=extras)
    assert list(exported) == ["model", "optimizer", "scheduler", "scaler"]
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(exported["scaler"])
    assert fresh.state_dict() == scaler.state_dict()
