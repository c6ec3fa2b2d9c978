"""Train a small ResNet with BatchNorm on a synthetic image task, checkpoint, resume, export to PyTorch.

    python examples/train_resnet.py                  # trains; run it again to resume
    python examples/train_resnet.py --fresh          # start over (deletes the checkpoints)

What it shows:
- the model is written with `flax_registry.nn` (PyTorch's layers, names and layouts);
- `flax_registry.train`: a jitted train step (BatchNorm statistics updated by the forward pass,
  never by the optimizer), PyTorch's SGD (momentum, nesterov, weight decay, a cosine learning
  rate schedule) with a second parameter group without weight decay for biases and BatchNorm
  weights, an eval step (BatchNorm on its running statistics);
- `flax_registry.checkpoint`: asynchronous orbax checkpoints every `--save-every` steps (the
  latest two kept); a restarted run resumes from the latest step, with the same data order;
- the trained weights are exported as a PyTorch `state_dict` in safetensors; when PyTorch is
  installed, the file is loaded into the same architecture written in PyTorch and the outputs
  are compared.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import flax_registry as fr
from flax_registry import nn, train
from flax_registry.checkpoint import CheckpointManager

CLASSES = 4


# --- the model -------------------------------------------------------------------------------


class BasicBlock(fr.Module):
    """torchvision's BasicBlock: two 3x3 convolutions with BatchNorm and a shortcut."""

    in_channels: int
    out_channels: int
    stride: int = 1

    def setup(self) -> None:
        c_in, c_out = self.in_channels, self.out_channels
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=self.stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if self.stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(  # mypy reads the dataclass fields
                nn.Conv2d(c_in, c_out, 1, stride=self.stride, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        out = self.bn2(self.conv2(out), train=train)
        shortcut = self.downsample(x, train=train) if hasattr(self, "downsample") else x
        return jax.nn.relu(out + shortcut)


class ResNet(fr.Module):
    width: int = 16
    classes: int = CLASSES

    def setup(self) -> None:
        w = self.width
        self.conv1 = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = BasicBlock(w, w)
        self.layer2 = BasicBlock(w, 2 * w, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, self.classes)

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        x = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        x = self.layer2(self.layer1(x, train=train), train=train)
        return self.fc(self.pool(x).reshape(x.shape[0], -1))


def torch_resnet(width: int = 16, classes: int = CLASSES) -> Any:
    """The same architecture in PyTorch (same module names, so the same state_dict keys)."""
    import torch

    class TorchBlock(torch.nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(c_out)
            self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
            self.bn2 = torch.nn.BatchNorm2d(c_out)
            self.downsample = None
            if stride != 1 or c_in != c_out:
                self.downsample = torch.nn.Sequential(
                    torch.nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                    torch.nn.BatchNorm2d(c_out),
                )

        def forward(self, x: Any) -> Any:
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + (x if self.downsample is None else self.downsample(x)))

    class TorchResNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, width, 3, padding=1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(width)
            self.layer1 = TorchBlock(width, width)
            self.layer2 = TorchBlock(width, 2 * width, stride=2)
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(2 * width, classes)

        def forward(self, x: Any) -> Any:
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.layer2(self.layer1(x))
            return self.fc(self.pool(x).flatten(1))

    return TorchResNet()


# --- the synthetic task ------------------------------------------------------------------------


def make_batch(index: int, batch_size: int, size: int, *, seed: int) -> tuple[Any, Any]:
    """Batch `index`: noisy copies of one fixed pattern per class. The batch depends only on
    its index, so a resumed run sees the same data as an uninterrupted one."""
    prototypes = np.random.default_rng(seed).standard_normal((CLASSES, 3, size, size))
    rng = np.random.default_rng((seed, index + 1000))  # held-out batches have index < 0
    labels = rng.integers(0, CLASSES, batch_size)
    images = prototypes[labels] + 2.5 * rng.standard_normal((batch_size, 3, size, size))
    return images.astype(np.float32), labels.astype(np.int32)


def loss_fn(model: Any, batch: Any) -> Any:
    images, labels = batch
    logits = model(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"accuracy": (logits.argmax(-1) == labels).mean()}


# --- training -------------------------------------------------------------------------------------


def make_optimizer(
    lr: float, total_steps: int
) -> tuple[optax.GradientTransformation, list[train.ParamGroup]]:
    """PyTorch's SGD with a cosine learning-rate schedule (PyTorch's `CosineAnnealingLR`
    stepped every step); biases and BatchNorm weights in a group without weight decay."""
    schedule = optax.cosine_decay_schedule(lr, total_steps)
    sgd = lambda wd: train.torch_sgd(schedule, momentum=0.9, nesterov=True, weight_decay=wd)  # noqa: E731
    no_decay = train.ParamGroup(["*.bias", "*bn*.weight", "*downsample.1.weight"], sgd(0.0))
    return sgd(5e-4), [no_decay]


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps")
    parser.add_argument("--ckpt-dir", type=Path, default=Path("/tmp/flax_registry_runs/resnet"))
    parser.add_argument(
        "--export", type=Path, default=None, help="default: CKPT_DIR/model.safetensors"
    )
    parser.add_argument("--fresh", action="store_true", help="delete the checkpoints first")
    args = parser.parse_args(argv)
    if args.fresh and args.ckpt_dir.exists():
        shutil.rmtree(args.ckpt_dir)

    model = ResNet()
    total = args.epochs * args.steps_per_epoch
    tx, groups = make_optimizer(args.lr, total)
    key = jax.random.key(args.seed)
    manager = CheckpointManager(
        args.ckpt_dir, model, max_to_keep=2, save_interval_steps=args.save_every
    )
    if manager.latest_step() is not None:
        target = train.create_train_state(
            model, fr.abstract_variables(model), tx, param_groups=groups
        )
        state = manager.restore(target)
        print(f"resumed from {args.ckpt_dir} at step {int(state.step)}")
    else:
        create = lambda k: train.create_train_state(  # noqa: E731
            model, fr.init_variables(model, k), tx, param_groups=groups, rng=k
        )
        state = jax.jit(create)(key)  # one compilation instead of one per eager operation
        print(f"new run, checkpoints in {args.ckpt_dir}")

    train_step = train.make_train_step(loss_fn)
    eval_step = train.make_eval_step(loss_fn)
    batch = lambda i: make_batch(i, args.batch_size, args.image_size, seed=args.seed)  # noqa: E731
    held_out = [batch(-1 - i) for i in range(4)]  # never trained on
    start = int(state.step)
    for epoch in range(start // args.steps_per_epoch, args.epochs):
        first = max(start, epoch * args.steps_per_epoch)
        last = (epoch + 1) * args.steps_per_epoch
        history = []
        bar = tqdm(range(first, last), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for index in bar:
            state, metrics = train_step(state, batch(index))
            history.append(metrics)
            manager.save(index + 1, state, force=index + 1 == total)
            if index % 10 == 0:
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
        bar.close()
        mean = lambda k, ms: float(np.mean([m[k] for m in ms]))  # noqa: E731
        evals = [eval_step(state, b) for b in held_out]
        print(
            f"epoch {epoch + 1}: train loss {mean('loss', history):.4f} "
            f"acc {mean('accuracy', history):.3f} | eval loss {mean('loss', evals):.4f} "
            f"acc {mean('accuracy', evals):.3f}"
        )
    manager.wait_until_finished()
    manager.close()
    return export(model, state, args.export or args.ckpt_dir / "model.safetensors", held_out[0][0])


def export(model: ResNet, state: train.TrainState, path: Path, images: Any) -> float | None:
    """Write the PyTorch state_dict as safetensors; check it in PyTorch when available."""
    from flax_registry.io import save_safetensors

    state_dict = {k: np.asarray(v) for k, v in fr.state_dict(model, state.variables).items()}
    save_safetensors(state_dict, path)
    print(f"exported {len(state_dict)} tensors (PyTorch state_dict keys) to {path}")
    try:
        import torch
        from safetensors.torch import load_file
    except ImportError:
        print("PyTorch is not installed: skipped the check in PyTorch")
        return None
    net = torch_resnet()
    net.load_state_dict(load_file(path), strict=True)
    net.eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(images)).numpy()
    ours = np.asarray(jax.jit(model.apply)(state.variables, jnp.asarray(images)))  # eval mode
    diff = float(np.abs(ours - expected).max())
    print(f"PyTorch loaded it (strict=True); max |output difference| = {diff:.2e}")
    return diff


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - t0:.1f}s")
