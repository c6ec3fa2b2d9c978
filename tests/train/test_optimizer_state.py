"""PyTorch's optimizer.state_dict() <-> TrainState.opt_state: parameter indices tied to torch
names through the registry (plain flax layers transposed, tied parameters once, frozen
parameters in or out of PyTorch's groups, PyTorch's own param_names), and every mismatch
(count, order, hyper-parameters, optimizer type) raises naming the group or parameter and
both sides, in the style of the load errors."""

from __future__ import annotations

import copy
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import flax_registry as fr
from flax_registry import train
from flax_registry.nn import Embedding, Linear

from ..parity import key
from .models import Net, TorchNet, batches, torch_variables

NO_DECAY = ["*.bias", "bn*.weight"]


def _torch_step(net: torch.nn.Module, opt: torch.optim.Optimizer, loss: Any) -> None:
    opt.zero_grad()
    loss(net).backward()
    opt.step()


def _net_loss(net: torch.nn.Module, seed: int = 0) -> Any:
    x, y = batches(1, seed=seed)[0]
    return torch.nn.functional.cross_entropy(net(torch.tensor(x)), torch.tensor(y).long())


def _assert_state_equal(ours: dict[str, Any], theirs: dict[str, Any], tol: float = 1e-5) -> None:
    assert list(ours["state"]) == list(theirs["state"])
    for i, st in theirs["state"].items():
        assert list(ours["state"][i]) == list(st)
        for k, v in st.items():
            np.testing.assert_allclose(
                np.asarray(ours["state"][i][k]), v.numpy(), rtol=tol, atol=tol
            )


class FlaxMLP(nn.Module):
    """Plain flax layers: kernels are (in, out), PyTorch's Linear weights (out, in)."""

    def setup(self) -> None:
        self.fc1 = nn.Dense(5)
        self.fc2 = nn.Dense(3)

    def __call__(self, x: Any) -> Any:
        return self.fc2(jax.nn.relu(self.fc1(x)))


def _mse(model: Any, batch: Any) -> Any:
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


def test_plain_flax_layers_get_their_state_in_their_own_layout() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("fc1", torch.nn.Linear(4, 5))
    net.add_module("relu", torch.nn.ReLU())
    net.add_module("fc2", torch.nn.Linear(5, 3))
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)) for _ in range(4)]  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    mse = lambda x, y: lambda n: torch.mean((n(torch.tensor(x)) - torch.tensor(y)) ** 2)  # noqa: E731
    for x, y in data[:2]:
        _torch_step(net, opt, mse(x, y))
    module, example = FlaxMLP(), (jnp.zeros((1, 4)),)
    variables, _ = fr.from_torch(module, net.state_dict(), example_inputs=example)
    tx = train.torch_adam(1e-2)
    state = train.create_train_state(module, variables, tx, rng=key(0))
    state, layout = train.optimizer_state_from_torch(
        state, opt.state_dict(), tx, example_inputs=example
    )
    kernel_m = state.opt_state.inner_states["default"].inner_state.exp_avg["fc1"]["kernel"]
    np.testing.assert_array_equal(kernel_m, opt.state_dict()["state"][0]["exp_avg"].numpy().T)
    step = train.make_train_step(_mse, donate=False)
    for x, y in data[2:]:
        _torch_step(net, opt, mse(x, y))
        state, _ = step(state, (jnp.asarray(x), jnp.asarray(y)))
    exported = train.optimizer_state_to_torch(state, tx, layout=layout, example_inputs=example)
    _assert_state_equal(exported, opt.state_dict())


class TiedLM(fr.Module):
    def setup(self) -> None:
        self.emb = Embedding(7, 4)
        self.head = Linear(4, 7)
        self.tie_parameters("head.weight", "emb.weight")

    def __call__(self, ids: Any, *, train: bool = False) -> Any:
        return self.head(self.emb(ids))


def test_tied_parameters_count_once_as_in_model_parameters() -> None:
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7)
    head.weight = emb.weight
    net = torch.nn.ModuleDict({"emb": emb, "head": head})
    assert [n for n, _ in net.named_parameters()] == ["emb.weight", "head.bias"]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    _torch_step(net, opt, lambda n: n["head"](n["emb"](ids)).logsumexp(-1).mean())
    module = TiedLM()
    variables, _ = fr.from_torch(module, net.state_dict())
    tx = train.torch_adamw(1e-2)
    state = train.create_train_state(module, variables, tx, rng=key(0))
    state, layout = train.optimizer_state_from_torch(state, opt.state_dict(), tx)
    assert layout.groups[0].names == ["emb.weight", "head.bias"]
    exported = train.optimizer_state_to_torch(state, tx, layout=layout)
    _assert_state_equal(exported, opt.state_dict(), tol=0)  # data movement only: bit-exact


def _net_state(tx: Any, **kw: Any) -> tuple[Any, torch.nn.Module]:
    torch.manual_seed(0)
    net = TorchNet()
    module = Net()
    return train.create_train_state(module, torch_variables(module, net), tx, rng=key(0), **kw), net


def test_frozen_parameters_handed_to_pytorch_are_found_by_group_size() -> None:
    tx = train.torch_sgd(0.1, momentum=0.9)
    state, net = _net_state(tx, frozen=["bn1.*"])
    for name in ("bn1.weight", "bn1.bias"):
        net.get_parameter(name).requires_grad_(False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)  # frozen ones included
    _torch_step(net, opt, _net_loss)
    loaded, layout = train.optimizer_state_from_torch(state, opt.state_dict(), tx, step=1)
    assert layout.frozen_in_optimizer and len(layout.groups[0].names) == 9
    exported = train.optimizer_state_to_torch(loaded, tx, layout=layout)
    assert exported["param_groups"][0]["params"] == opt.state_dict()["param_groups"][0]["params"]
    _assert_state_equal(exported, opt.state_dict(), tol=0)

    # a parameter trained, then frozen: PyTorch keeps its momentum; kept here and written back
    trained_then_frozen, _ = _net_state(tx, frozen=["bn1.*", "fc.bias"])
    net.get_parameter("fc.bias").requires_grad_(False)
    _, layout = train.optimizer_state_from_torch(
        trained_then_frozen, opt.state_dict(), tx, step=1, frozen_in_optimizer=True
    )
    assert list(layout.frozen_state) == ["fc.bias"]


def test_param_names_saved_by_pytorch_give_the_order() -> None:
    tx = train.torch_adam(1e-2)
    no_decay = train.torch_adam(1e-2)
    state, net = _net_state(tx, param_groups=[train.ParamGroup(NO_DECAY, no_decay)])
    named = list(net.named_parameters())
    groups = [  # PyTorch >= 2.6 records param_names when given named parameters
        {"params": [(n, p) for n, p in reversed(named) if "bias" in n or n.startswith("bn")]},
        {"params": [(n, p) for n, p in reversed(named) if not ("bias" in n or n.startswith("bn"))]},
    ]
    opt = torch.optim.Adam(groups, lr=1e-2)
    _torch_step(net, opt, _net_loss)
    assert "param_names" in opt.state_dict()["param_groups"][0]
    loaded, layout = train.optimizer_state_from_torch(state, opt.state_dict(), tx, param_groups=[train.ParamGroup(NO_DECAY, no_decay)])  # fmt: skip
    assert [g.label for g in layout.groups] == ["group0", "default"]
    exported = train.optimizer_state_to_torch(
        loaded, tx, param_groups=[train.ParamGroup(NO_DECAY, no_decay)], layout=layout
    )
    assert exported["param_groups"] == opt.state_dict()["param_groups"]
    _assert_state_equal(exported, opt.state_dict(), tol=0)


def test_group_order_names_pytorch_groups_in_another_order() -> None:
    tx = train.torch_sgd(0.1, momentum=0.9, weight_decay=1e-2)
    groups = [train.ParamGroup(NO_DECAY, train.torch_sgd(0.1, momentum=0.9), name="no_decay")]
    state, net = _net_state(tx, param_groups=groups)
    params = dict(net.named_parameters())
    no_decay = [p for n, p in params.items() if n.endswith(".bias") or n.startswith("bn")]
    decay = [p for n, p in params.items() if not (n.endswith(".bias") or n.startswith("bn"))]
    opt = torch.optim.SGD([{"params": no_decay, "weight_decay": 0.0}, {"params": decay}], lr=0.1, momentum=0.9, weight_decay=1e-2)  # fmt: skip
    _torch_step(net, opt, _net_loss)
    with pytest.raises(
        ValueError, match=r"param_groups\[0\] holds 6 parameters .*group 'default' holds 3"
    ):
        train.optimizer_state_from_torch(state, opt.state_dict(), tx, param_groups=groups, step=1)
    order = ["no_decay", "default"]
    loaded, layout = train.optimizer_state_from_torch(
        state, opt.state_dict(), tx, param_groups=groups, step=1, group_order=order
    )
    exported = train.optimizer_state_to_torch(loaded, tx, param_groups=groups, group_order=order)
    _assert_state_equal(exported, opt.state_dict(), tol=0)


def _saved(make: Any, params: Any = None) -> tuple[dict[str, Any], Any]:
    torch.manual_seed(0)
    net = TorchNet()
    opt = make(net.parameters() if params is None else params(net))
    _torch_step(net, opt, _net_loss)
    return copy.deepcopy(opt.state_dict()), net


def test_mismatches_raise_naming_the_group_the_parameter_and_both_sides() -> None:
    adam = lambda p: torch.optim.Adam(p, lr=1e-2)  # noqa: E731
    tx = train.torch_adam(1e-2)
    state, _ = _net_state(tx)

    saved, _ = _saved(adam, lambda n: [{"params": [p for k, p in n.named_parameters() if k != "fc.bias"]}, {"params": [n.fc.bias]}])  # fmt: skip
    with pytest.raises(ValueError, match=r"different number of parameter groups: .* has 2 \(sizes \[8, 1\]\), flax_registry's has 1 \('default': 9\)"):  # fmt: skip
        train.optimizer_state_from_torch(state, saved, tx)

    saved, _ = _saved(adam, lambda n: [p for k, p in n.named_parameters() if k != "fc.bias"])
    with pytest.raises(ValueError, match=r"doesn't match the size of optimizer's group: param_groups\[0\] holds 8 parameters in the checkpoint, flax_registry's group 'default' holds 9"):  # fmt: skip
        train.optimizer_state_from_torch(state, saved, tx)

    saved, _ = _saved(adam, lambda n: list(reversed(list(n.parameters()))))
    with pytest.raises(ValueError, match=r"size mismatch for optimizer state 'exp_avg' of parameter 0 \('conv1.weight'\): copying a tensor with shape \(3,\) from checkpoint, the shape in current model is \(4, 3, 3, 3\)"):  # fmt: skip
        train.optimizer_state_from_torch(state, saved, tx)

    saved, _ = _saved(lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3))
    with pytest.raises(ValueError, match=r"param_groups\[0\] \(flax_registry group 'default'\): weight_decay is 0.001 in the checkpoint, but 0.0 in fr.train.torch_adam"):  # fmt: skip
        train.optimizer_state_from_torch(state, saved, tx)

    saved, _ = _saved(lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9))
    with pytest.raises(ValueError, match=r"has the hyper-parameters of torch.optim.SGD \(dampening, momentum, nesterov\), but flax_registry group 'default' is trained by fr.train.torch_adam \(Adam\). Fix: train that group with fr.train.torch_sgd"):  # fmt: skip
        train.optimizer_state_from_torch(state, saved, tx)

    saved, _ = _saved(lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True))
    with pytest.raises(ValueError, match=r"has entries \['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq', 'step'\], expected \['exp_avg', 'exp_avg_sq', 'step'\] for torch.optim.Adam with amsgrad=False"):  # fmt: skip
        train.optimizer_state_from_torch(state, saved, tx)

    saved, _ = _saved(adam)
    with pytest.raises(TypeError, match=r"group 'default' is trained by .* not torch_sgd, torch_adam or torch_adamw"):  # fmt: skip
        train.optimizer_state_from_torch(state, saved, optax.adam(1e-2))
    with pytest.raises(ValueError, match=r"step is 7, but the checkpoint's optimizer state says 1 steps"):  # fmt: skip
        train.optimizer_state_from_torch(state, saved, tx, step=7)

    saved, _ = _saved(adam, lambda n: [(k, p) for k, p in n.named_parameters() if k != "fc.bias"])
    with pytest.raises(ValueError, match=r"parameters \['fc.bias'\] of Net are trained here but in none of the checkpoint's param_groups"):  # fmt: skip
        train.optimizer_state_from_torch(state, saved, tx)

    sgd = train.torch_sgd(1e-2, momentum=0.9)
    sgd_state, _ = _net_state(sgd)
    saved, _ = _saved(lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9))
    with pytest.raises(ValueError, match=r"torch.optim.SGD saves no step count"):
        train.optimizer_state_from_torch(sgd_state, saved, sgd)
