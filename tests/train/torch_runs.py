"""PyTorch's training loops the distributed tests compare against, in one process: the
full-batch step, gradient accumulation (`(loss / K).backward()` K times, then
`optimizer.step()`) and DistributedDataParallel's math (each replica's forward and backward on
its own part of the batch, starting from rank 0's buffers; gradients averaged; rank 0's
updated buffers kept), which is all of them for `replicas=1` / `micro_batches=1`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .models import TorchNet


def backward(
    net: torch.nn.Module, x: np.ndarray, y: np.ndarray, replicas: int = 1, micro_batches: int = 1
) -> float:
    """Set `p.grad` as one DDP step over `replicas` ranks, each accumulating over
    `micro_batches` micro-batches of its part, would; return the mean loss."""
    params = list(net.parameters())
    start = {k: b.clone() for k, b in net.named_buffers()}
    total: list[torch.Tensor] | None = None
    losses: list[float] = []
    first: dict[str, torch.Tensor] = {}
    for r, (xr, yr) in enumerate(zip(np.split(x, replicas), np.split(y, replicas))):
        for k, b in net.named_buffers():  # broadcast_buffers=True: rank 0's buffers
            b.copy_(start[k])
        net.zero_grad()
        for xk, yk in zip(np.split(xr, micro_batches), np.split(yr, micro_batches)):
            out = net(torch.tensor(xk))
            loss = torch.nn.functional.cross_entropy(out, torch.tensor(yk).long())
            (loss / micro_batches).backward()
            losses.append(float(loss.detach()))
        grads = [p.grad.clone() for p in params]  # type: ignore[union-attr]
        total = grads if total is None else [a + g for a, g in zip(total, grads)]
        if r == 0:
            first = {k: b.clone() for k, b in net.named_buffers()}
    assert total is not None
    for p, g in zip(params, total):  # the all-reduce: the mean over ranks
        p.grad = g / replicas
    for k, b in net.named_buffers():
        b.copy_(first[k])
    return float(np.mean(losses))


def record(net: torch.nn.Module, opt: torch.optim.Optimizer, loss: float) -> dict[str, Any]:
    """Parameters, buffers, Adam's moments (or SGD's momentum) and the loss, by name."""
    out: dict[str, Any] = {"loss": np.float32(loss)}
    out.update({f"param/{k}": p.detach().numpy().copy() for k, p in net.named_parameters()})
    out.update({f"buffer/{k}": b.numpy().copy() for k, b in net.named_buffers()})
    for name, p in net.named_parameters():
        for field, value in opt.state[p].items():
            if field != "step":
                out[f"{field}/{name}"] = value.numpy().copy()
    return out


def train(
    initial: dict[str, torch.Tensor],
    data: Sequence[tuple[np.ndarray, np.ndarray]],
    make_opt: Callable[[Any], torch.optim.Optimizer],
    *,
    replicas: int = 1,
    micro_batches: int = 1,
    channels: int = 8,
    classes: int = 4,
) -> list[dict[str, Any]]:
    """`TorchNet` from `initial`, trained one step per batch; the `record` after each step."""
    net = TorchNet(channels=channels, classes=classes)
    net.load_state_dict(initial)
    net.train()
    opt = make_opt(net.parameters())
    out = []
    for x, y in data:
        opt.zero_grad()
        loss = backward(net, x, y, replicas, micro_batches)
        opt.step()
        out.append(record(net, opt, loss))
    return out
