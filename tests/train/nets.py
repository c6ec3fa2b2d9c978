"""The flax_registry half of `models.py` (the conv net, the batches, the loss), without
torch: the multi-device child processes import it, and importing torch would cost them
seconds each."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

import flax_registry as fr
from flax_registry.nn import BatchNorm2d, Conv2d, Linear


class Net(fr.Module):
    """conv1 -> bn1 -> relu -> conv2 (stride 2) -> relu -> bn2 -> mean -> fc.

    (conv2's bias sits before a ReLU, not right before a BatchNorm, where its gradient would be
    zero up to rounding and Adam would amplify the rounding noise of either framework.)"""

    channels: int = 4
    classes: int = 3

    def setup(self) -> None:
        c = self.channels
        self.conv1 = Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(c)
        self.conv2 = Conv2d(c, c, 3, stride=2, padding=1)
        self.bn2 = BatchNorm2d(c)
        self.fc = Linear(c, self.classes)

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        x = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        x = self.bn2(jax.nn.relu(self.conv2(x)), train=train)
        return self.fc(x.mean(axis=(2, 3)))


def batches(n: int, *, batch: int = 4, size: int = 6, seed: int = 0) -> list[tuple[Any, Any]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.standard_normal((batch, 3, size, size)).astype(np.float32),
            rng.integers(0, 3, batch).astype(np.int32),
        )
        for _ in range(n)
    ]


def cross_entropy(model: Any, batch: Any) -> Any:
    """The loss function of the tests: mean cross-entropy, plus accuracy as a metric."""
    import optax

    x, y = batch
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"accuracy": (logits.argmax(-1) == y).mean()}
