"""BatchNorm across data-parallel replicas, against PyTorch on the same numbers: per-replica
statistics are PyTorch's BatchNorm run on each replica's part (rank 0's running statistics
kept), global statistics and `SyncBatchNorm` are the full-batch BatchNorm, a layer's `stats=`
overrides the model-wide setting, and a 4-replica DDP run is reproduced on one device. (The
same on 8 devices with a sharded batch: `test_sharded_training.py`.)"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_registry as fr
from flax_registry import nn, train
from flax_registry.nn.mode import GLOBAL, PER_REPLICA, replicas

from ..parity import assert_buffers_match, assert_close, key, load_from_torch
from . import torch_runs
from .models import Net, TorchNet, batches, cross_entropy, torch_variables


def _torch_bn(cls: type, c: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    bn = cls(c, momentum=0.3)
    with torch.no_grad():  # non-trivial affine and running statistics
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def _forward(module: Any, variables: Any, x: np.ndarray, **context: Any) -> tuple[Any, Any]:
    with replicas(**context):
        return fr.apply(module, variables, jnp.asarray(x), train=True)


@pytest.mark.parametrize(
    "cls, shape", [("BatchNorm1d", (8, 3)), ("BatchNorm2d", (8, 3, 4, 4)), ("BatchNorm3d", (8, 3, 2, 2, 2))]
)  # fmt: skip
def test_per_replica_statistics_are_pytorch_on_each_part(cls: str, shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 2 + 1
    bn = _torch_bn(getattr(torch.nn, cls), 3)
    module = getattr(nn, cls)(3, momentum=0.3)
    variables = load_from_torch(module, bn)
    y, new = _forward(module, variables, x, count=4, batch_stats=PER_REPLICA)
    start = {k: v.clone() for k, v in bn.state_dict().items()}
    parts = []
    for r, xr in enumerate(np.split(x, 4)):
        bn.load_state_dict(start)  # every replica starts from rank 0's buffers
        parts.append(bn.train()(torch.tensor(xr)).detach())
        if r == 0:
            first = {k: v.clone() for k, v in bn.state_dict().items()}
    assert_close(y, torch.cat(parts))
    bn.load_state_dict(first)  # rank 0's updated buffers
    assert_buffers_match(module, new, bn)
    # the whole batch's statistics are something else
    y_global, _ = _forward(module, variables, x, count=4, batch_stats=GLOBAL)
    assert not np.allclose(np.asarray(y_global), np.asarray(y), atol=1e-3)


def test_global_statistics_and_sync_batchnorm_are_the_full_batch() -> None:
    x = np.random.default_rng(1).standard_normal((8, 3, 5)).astype(np.float32)
    bn = _torch_bn(torch.nn.BatchNorm1d, 3)
    sync = _torch_bn(torch.nn.SyncBatchNorm, 3)  # one process: PyTorch's BatchNorm math
    expected = bn.train()(torch.tensor(x)).detach()
    assert_close(sync.train()(torch.tensor(x)).detach(), expected)
    for module, torch_module in ((nn.BatchNorm1d(3, momentum=0.3), bn), (nn.SyncBatchNorm(3, momentum=0.3), sync)):  # fmt: skip
        variables = load_from_torch(module, _torch_bn(type(torch_module), 3))
        context = {"count": 4, "batch_stats": GLOBAL}
        if isinstance(module, nn.SyncBatchNorm):  # global whatever the model-wide setting
            context["batch_stats"] = PER_REPLICA
        y, new = _forward(module, variables, x, **context)
        assert_close(y, expected)
        assert_buffers_match(module, new, torch_module)
        assert list(fr.state_dict(module, new)) == list(torch_module.state_dict())


class TwoNorms(fr.Module):
    def setup(self) -> None:
        self.follows = nn.BatchNorm1d(3)  # the model-wide setting
        self.synced = nn.BatchNorm1d(3, stats="global")  # always global

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        return self.follows(x, train=train), self.synced(x, train=train)


def test_a_layer_overrides_the_model_wide_setting() -> None:
    x = np.random.default_rng(2).standard_normal((8, 3)).astype(np.float32)
    module = TwoNorms()
    variables = fr.init_variables(module, key(0))
    (per_replica, synced), _ = _forward(module, variables, x, count=2, batch_stats=PER_REPLICA)
    bn = torch.nn.BatchNorm1d(3).train()
    assert_close(synced, bn(torch.tensor(x)).detach())
    halves = [torch.nn.BatchNorm1d(3).train()(torch.tensor(h)).detach() for h in np.split(x, 2)]
    assert_close(per_replica, torch.cat(halves))


def test_a_4_gpu_ddp_run_reproduced_on_one_device() -> None:
    torch.manual_seed(0)
    net = TorchNet()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    data = batches(3, batch=8)
    sgd = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)  # noqa: E731
    expected = torch_runs.train(initial, data, sgd, replicas=4, channels=4, classes=3)
    module = Net()
    state = train.create_train_state(
        module, torch_variables(module, net), train.torch_sgd(0.1, momentum=0.9)
    )
    step = train.make_train_step(cross_entropy, batch_norm="per_replica", replicas=4)
    for i, batch in enumerate(data):
        state, metrics = step(state, batch)
        assert_close(metrics["loss"], expected[i]["loss"])
    ours = dict(fr.named_parameters(module, state.variables))
    ours.update({f"buffer/{k}": v for k, v in fr.named_buffers(module, state.variables)})
    for name, value in expected[-1].items():
        if name.startswith("param/"):
            assert_close(ours[name[len("param/") :]], value)
        elif name.startswith("buffer/"):
            np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_errors_name_the_problem_and_the_fix() -> None:
    module = nn.BatchNorm1d(3)
    variables = fr.init_variables(module, key(0))
    x = np.zeros((6, 3), np.float32)
    with pytest.raises(ValueError, match=r"split the batch axis into 4 equal parts .* shape \[6, 3\], whose batch size 6 is not a multiple of 4: make the global batch size a multiple"):  # fmt: skip
        _forward(module, variables, x, count=4, batch_stats=PER_REPLICA)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size \[1, 3\]"):  # fmt: skip
        _forward(module, variables, x[:4], count=4, batch_stats=PER_REPLICA)
    with pytest.raises(ValueError, match=r"batch_stats must be one of \('global', 'per_replica'\) .* got 'sync'"):  # fmt: skip
        _forward(nn.BatchNorm1d(3, stats="sync"), variables, x, count=2)
    with pytest.raises(ValueError, match="batch_stats must be one of"):
        train.make_train_step(cross_entropy, batch_norm="ddp")
