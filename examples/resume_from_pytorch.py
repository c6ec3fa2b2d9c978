"""Move a training run from PyTorch to JAX mid-way, and back, through the usual checkpoint.

    python examples/resume_from_pytorch.py                 # writes resume_from_pytorch.png
    python examples/resume_from_pytorch.py --plot out.png

Three runs of the same small CNN with BatchNorm on the same batches:

1. PyTorch trains for all `--steps` steps (the reference);
2. PyTorch trains `--switch` steps and saves the usual `torch.save({"model": ..., "optimizer":
   ..., "scheduler": ..., "epoch": ..., "rng_state": ..., "scaler": ...})` checkpoint;
   `flax_registry.train.from_torch_checkpoint` reads it (no torch needed) and training
   continues in JAX up to step `--back`;
3. `to_torch_checkpoint` writes the JAX state back; PyTorch loads it with `load_state_dict`
   (model, optimizer, scheduler) and trains the remaining steps.

The optimizer is PyTorch's AdamW with two parameter groups (no weight decay for biases and
BatchNorm weights) and a frozen first convolution; the learning rate follows linear warmup
then cosine annealing (`SequentialLR`). The loss curves agree step for step (a printed table
and a PNG plot), and the final weights equal the reference's.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from torch.optim import lr_scheduler as L

import flax_registry as fr
from flax_registry import nn, train

CLASSES, CHANNELS, SIZE = 4, 8, 8
LR, WEIGHT_DECAY, WARMUP = 5e-2, 0.05, 5
FROZEN = "conv1.weight"  # requires_grad_(False): a frozen stem


# --- the model, in PyTorch and in flax_registry.nn (same names, shapes and layouts) -----------


class TorchCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        c = CHANNELS
        self.conv1 = torch.nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(c)
        self.fc = torch.nn.Linear(c, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(torch.relu(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class CNN(fr.Module):
    def setup(self) -> None:
        c = CHANNELS
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, CLASSES)

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        x = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        x = self.bn2(jax.nn.relu(self.conv2(x)), train=train)
        return self.fc(x.mean(axis=(2, 3)))


def make_batches(steps: int, batch: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Images whose class is the quadrant holding the brightest 3x3 patch."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        x = rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
        y = rng.integers(0, CLASSES, batch)
        for i, label in enumerate(y):
            r, c = divmod(int(label), 2)
            x[i, :, r * 4 + 1 : r * 4 + 3, c * 4 + 1 : c * 4 + 3] += 3.0
        out.append((x, y.astype(np.int32)))
    return out


# --- PyTorch side ------------------------------------------------------------------------------


def is_no_decay(name: str) -> bool:
    return name.endswith(".bias") or name.startswith("bn")


def torch_run(total: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """A fresh PyTorch model, AdamW over two groups and warmup + cosine (seeded: same init)."""
    torch.manual_seed(0)
    model = TorchCNN()
    model.get_parameter(FROZEN).requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in trainable if not is_no_decay(n)]},
        {"params": [p for n, p in trainable if is_no_decay(n)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)
    warmup = L.LinearLR(optimizer, start_factor=0.1, total_iters=WARMUP)
    cosine = L.CosineAnnealingLR(optimizer, T_max=total - WARMUP)
    scheduler = L.SequentialLR(optimizer, [warmup, cosine], milestones=[WARMUP])
    return model, optimizer, scheduler


def torch_steps(model: Any, optimizer: Any, scheduler: Any, batches: list[Any]) -> list[float]:
    losses = []
    model.train()
    for x, y in batches:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            model(torch.from_numpy(x)), torch.from_numpy(y).long()
        )
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return losses


# --- flax_registry side: the same optimizer and schedule, written once ----------------------


def flax_optimizer(total: int) -> tuple[optax.GradientTransformation, list[train.ParamGroup]]:
    """PyTorch's AdamW groups and SequentialLR, with PyTorch's arguments."""
    schedule = train.SequentialLR(
        [
            train.LinearLR(start_factor=0.1, total_iters=WARMUP),
            train.CosineAnnealingLR(total - WARMUP),
        ],
        milestones=[WARMUP],
    )
    tx = train.torch_adamw(schedule.schedule(LR), weight_decay=WEIGHT_DECAY)
    no_decay = train.torch_adamw(schedule.schedule(LR), weight_decay=0.0)
    return tx, [train.ParamGroup(["*.bias", "bn*"], no_decay, name="no_decay")]


def cross_entropy(model: Any, batch: Any) -> Any:
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def flax_steps(state: train.TrainState, batches: list[Any]) -> tuple[train.TrainState, list[float]]:
    step = train.make_train_step(cross_entropy)
    losses = []
    for x, y in batches:
        state, metrics = step(state, (jnp.asarray(x), jnp.asarray(y)))
        losses.append(float(metrics["loss"]))
    return state, losses


# --- the three runs -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--switch", type=int, default=10, help="PyTorch -> JAX at this step")
    parser.add_argument("--back", type=int, default=20, help="JAX -> PyTorch at this step")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--plot", type=Path, default=Path("resume_from_pytorch.png"))
    parser.add_argument("--ckpt-dir", type=Path, default=None, help="default: a temporary dir")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with warnings.catch_warnings():  # PyTorch: "lr_scheduler.step() before optimizer.step()"
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
        return run(args)


def run(args: argparse.Namespace) -> float:
    total, switch, back = args.steps, args.switch, args.back
    batches = make_batches(total, args.batch_size, seed=0)
    ckpt_dir = args.ckpt_dir or Path(tempfile.mkdtemp(prefix="resume_from_pytorch_"))
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    # 1. the reference: PyTorch, uninterrupted
    reference, ref_opt, ref_sched = torch_run(total)
    ref_losses = torch_steps(reference, ref_opt, ref_sched, batches)

    # 2. PyTorch for `switch` steps, the usual checkpoint, then JAX
    model, optimizer, scheduler = torch_run(total)
    torch_losses = torch_steps(model, optimizer, scheduler, batches[:switch])
    scaler = torch.amp.GradScaler("cpu")  # a mixed-precision loop saves one: kept as an extra
    torch.save(
        {
            "epoch": 0,
            "step": switch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng_state": torch.get_rng_state(),
        },
        ckpt_dir / "from_pytorch.pt",
    )
    tx, groups = flax_optimizer(total)
    state, extras = train.from_torch_checkpoint(
        ckpt_dir / "from_pytorch.pt",
        CNN(),
        tx,
        frozen=[FROZEN],
        param_groups=groups,
        rng=jax.random.key(0, impl="rbg"),
    )
    print(extras, "\n")
    state, jax_losses = flax_steps(state, batches[switch:back])

    # 3. back to PyTorch: torch.save, then the usual three load_state_dict calls
    extras["step"] = back
    torch.save(
        train.to_torch_checkpoint(state, tx, param_groups=groups, extras=extras),
        ckpt_dir / "from_jax.pt",
    )
    ckpt = torch.load(ckpt_dir / "from_jax.pt")  # weights_only: plain tensors and containers
    model, optimizer, scheduler = torch_run(total)
    model.load_state_dict(ckpt["model"], strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    back_losses = torch_steps(model, optimizer, scheduler, batches[back:])

    resumed = torch_losses + jax_losses + back_losses
    loss_diff = float(np.max(np.abs(np.array(resumed) - np.array(ref_losses))))
    weight_diff = max(
        float((model.state_dict()[k].double() - v.double()).abs().max())
        for k, v in reference.state_dict().items()
    )
    print(f"{'step':>4}  {'run':<26} {'PyTorch throughout':>18} {'resumed run':>12} {'|diff|':>9}")
    where = ["PyTorch"] * switch + ["JAX (from PyTorch ckpt)"] * (back - switch)
    where += ["PyTorch (from JAX ckpt)"] * (total - back)
    for t in range(total):
        if t % 2 == 0 or t in (switch - 1, switch, back - 1, back, total - 1):
            diff = abs(resumed[t] - ref_losses[t])
            print(f"{t:>4}  {where[t]:<26} {ref_losses[t]:>18.6f} {resumed[t]:>12.6f} {diff:>9.1e}")
    plot(args.plot, ref_losses, resumed, switch, back)
    ok = loss_diff < 1e-4 and weight_diff < 1e-4
    print(f"\nmax |loss difference| {loss_diff:.1e}, max |weight difference| {weight_diff:.1e}")
    print(f"the three runs agree (1e-4): {'yes' if ok else 'NO'}")
    return max(loss_diff, weight_diff)


def plot(path: Path, reference: list[float], resumed: list[float], switch: int, back: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: no plot written to {path})")
        return
    steps = np.arange(len(reference))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, reference, color="0.6", lw=5, label="PyTorch, uninterrupted")
    parts = [
        (slice(0, switch), "PyTorch", "tab:blue"),
        (slice(switch - 1, back), "flax_registry (from the PyTorch checkpoint)", "tab:orange"),
        (slice(back - 1, len(resumed)), "PyTorch (from the flax_registry checkpoint)", "tab:green"),
    ]
    for part, label, color in parts:
        ax.plot(
            steps[part], np.array(resumed)[part], color=color, lw=1.8, marker="o", ms=3, label=label
        )
    for x in (switch, back):
        ax.axvline(x - 0.5, color="k", ls=":", lw=1)
    ax.set(xlabel="step", ylabel="training loss", title="One run, two frameworks")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"loss curves written to {path}")


if __name__ == "__main__":
    main()
