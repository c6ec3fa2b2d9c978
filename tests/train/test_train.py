"""The optimizer sees parameters only: buffers get no update, gradient or optimizer state;
frozen parameters never change and hold no optimizer state; groups and steps behave."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import flax_registry as fr
from flax_registry import train
from flax_registry._nested import leaf_paths

from .models import Net, TorchNet, batches, cross_entropy, torch_variables


class Toy(fr.Module):
    """A linear map with a frozen matrix, a constant persistent buffer, a non-persistent mask
    and a counter the forward pass updates."""

    def setup(self) -> None:
        self.register_parameter("weight", fr.Parameter(jnp.ones((3, 3))))
        self.register_parameter("frozen", fr.Parameter(jnp.full((3,), 2.0), trainable=False))
        self.register_parameter("bias", fr.Parameter(jnp.zeros(3)))
        self.register_buffer("scale", jnp.full((3,), 0.5))
        self.register_buffer("mask", jnp.array([1.0, 0.0, 1.0]), persistent=False)
        self.register_buffer("calls", jnp.zeros((), jnp.int32))

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        if train:
            self.update_buffer("calls", self.calls + 1)
        return (
            (x @ self.weight.T * self.frozen + self.get_parameter("bias")) * self.scale * self.mask
        )


def _mse(model: Any, batch: Any) -> Any:
    return jnp.mean((model(batch) - 1.0) ** 2)


def _array_leaves(opt_state: Any) -> dict[tuple[str, ...], Any]:
    return {p: v for p, v in leaf_paths(opt_state).items() if np.ndim(v) > 0}


X = jnp.arange(6.0).reshape(2, 3)


def test_buffers_get_no_update_gradient_or_state_and_weight_decay_spares_them() -> None:
    module = Toy()
    variables = fr.init_variables(module, jax.random.key(0))
    tx = train.torch_adamw(0.5, weight_decay=0.9)  # large decay: any leak would show
    state = train.create_train_state(module, variables, tx)
    step = train.make_train_step(_mse, donate=False)
    start = state
    for _ in range(3):
        state, _ = step(state, X)
    buffers = state.buffers["buffers"]
    np.testing.assert_array_equal(buffers["scale"], start.buffers["buffers"]["scale"])
    np.testing.assert_array_equal(buffers["mask"], start.buffers["buffers"]["mask"])
    assert int(buffers["calls"]) == 3  # changed by the forward pass only
    # optimizer state: only parameter-shaped leaves of trainable parameters
    state_leaves = _array_leaves(state.opt_state)
    assert state_leaves, "expected Adam moments"
    for path in state_leaves:
        assert path[-1] in ("weight", "bias"), path  # never a buffer, never 'frozen'
    assert len(state_leaves) == 2 * 2  # exp_avg and exp_avg_sq of weight and bias
    # the parameters did move
    assert not np.allclose(state.params["weight"], start.params["weight"])


def test_buffers_are_what_the_forward_pass_made_them() -> None:
    net = TorchNet()
    module = Net()
    variables = torch_variables(module, net)
    state = train.create_train_state(module, variables, train.torch_sgd(1.0, weight_decay=0.5))
    x, y = batches(1)[0]
    forward = jax.jit(lambda v, x: fr.apply(module, v, x, train=True)[1])
    expected = forward(variables, jnp.asarray(x))
    new_state, _ = train.make_train_step(cross_entropy, donate=False)(state, (x, y))
    for key, value in fr.named_buffers(module, expected):  # weight decay 0.5 would show
        np.testing.assert_allclose(
            fr.get_buffer(module, new_state.variables, key), value, rtol=1e-6
        )


def test_frozen_parameters_never_change_and_hold_no_state() -> None:
    net = TorchNet()
    module = Net()
    variables = torch_variables(module, net)
    tx = train.torch_adamw(1e-1, weight_decay=0.5)
    state = train.create_train_state(
        module, variables, tx, frozen=["conv1.*", re.compile("bn1\\..*")]
    )
    assert state.frozen == {("conv1", "weight"), ("bn1", "weight"), ("bn1", "bias")}
    labels = train.param_labels(module, variables, frozen=["conv1.*", re.compile("bn1\\..*")])
    assert labels["conv1"]["weight"] == train.FROZEN and labels["fc"]["bias"] == train.DEFAULT
    # no optimizer state for frozen parameters: not zeros of full size, absent
    paths = _array_leaves(state.opt_state)
    assert not [p for p in paths if p[-2:-1] in (("conv1",), ("bn1",))]
    trainable = [p for p in leaf_paths(state.params) if p[0] not in ("conv1", "bn1")]
    assert len(paths) == 2 * len(trainable)
    frozen_inner = state.opt_state.inner_states[train.FROZEN]
    assert jax.tree.leaves(frozen_inner) == []
    step = train.make_train_step(cross_entropy, donate=False)
    after = state
    for batch in batches(3):
        after, _ = step(after, batch)
    for key in ("conv1.weight", "bn1.weight", "bn1.bias"):
        np.testing.assert_array_equal(
            fr.get_parameter(module, after.variables, key),
            fr.get_parameter(module, state.variables, key),
        )
    assert not np.allclose(after.params["fc"]["weight"], state.params["fc"]["weight"])
    # frozen parameters stay in state_dict
    assert "conv1.weight" in fr.state_dict(module, after.variables)


def test_trainable_false_parameter_is_frozen_without_patterns() -> None:
    module = Toy()
    variables = fr.init_variables(module, jax.random.key(0))
    state = train.create_train_state(module, variables, optax.sgd(1.0))
    assert state.frozen == {("frozen",)}
    new, _ = train.make_train_step(_mse, donate=False)(state, X)
    np.testing.assert_array_equal(new.params["frozen"], variables["params"]["frozen"])


def test_param_groups_get_their_own_transform() -> None:
    module = Toy()
    variables = fr.init_variables(module, jax.random.key(0))
    groups = [train.ParamGroup(["bias"], optax.sgd(0.0), name="still")]
    state = train.create_train_state(module, variables, optax.sgd(0.1), param_groups=groups)
    new, _ = train.make_train_step(_mse, donate=False)(state, X)
    np.testing.assert_array_equal(new.params["bias"], variables["params"]["bias"])
    assert not np.array_equal(new.params["weight"], variables["params"]["weight"])
    labels = train.param_labels(module, variables, param_groups=groups)
    assert labels == {"weight": "default", "frozen": "frozen", "bias": "still"}


def test_unmatched_pattern_and_bad_groups_raise_clearly() -> None:
    module = Toy()
    variables = fr.init_variables(module, jax.random.key(0))
    with pytest.raises(
        ValueError, match=r"frozen pattern 'encoder\.\*' matches no parameter of Toy"
    ):
        train.create_train_state(module, variables, optax.sgd(0.1), frozen="encoder.*")
    with pytest.raises(ValueError, match="ParamGroup 'group0' pattern"):
        train.create_train_state(
            module, variables, optax.sgd(0.1), param_groups=[("*.bias", optax.sgd(0.1))]
        )
    with pytest.raises(ValueError, match="'frozen' and 'default' are"):
        train.param_labels(
            module, variables, param_groups=[train.ParamGroup("bias", optax.sgd(1), "frozen")]
        )
    with pytest.raises(TypeError, match="str \\(glob\\) or a re.Pattern"):
        train.param_labels(module, variables, frozen=[3])  # type: ignore[list-item]


def test_eval_step_uses_buffers_without_changing_them() -> None:
    net = TorchNet()
    module = Net()
    variables = torch_variables(module, net)
    state = train.create_train_state(module, variables, optax.sgd(0.1))
    x, y = batches(1)[0]
    metrics = train.make_eval_step(cross_entropy)(state, (x, y))
    net.eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(net(torch.tensor(x)), torch.tensor(y).long())
    np.testing.assert_allclose(metrics["loss"], expected.numpy(), rtol=1e-5)
    # a module that tries to change a buffer in an eval step raises
    bad = train.make_eval_step(cross_entropy, call_kwargs={"train": True})
    with pytest.raises(RuntimeError, match="cannot update buffer 'num_batches_tracked'"):
        bad(state, (x, y))


def test_buffers_flow_through_several_forward_passes() -> None:
    module = Toy()
    state = train.create_train_state(
        module, fr.init_variables(module, jax.random.key(0)), optax.sgd(0.1)
    )

    def twice(model: Any, batch: Any) -> Any:
        return jnp.mean(model(batch)) + jnp.mean(model(batch))

    new, metrics = train.make_train_step(twice, donate=False)(state, X)
    assert int(new.buffers["buffers"]["calls"]) == 2
    assert set(metrics) == {"loss"}


class Dropper(fr.Module):
    def setup(self) -> None:
        self.register_parameter("w", fr.Parameter(jnp.ones(64)))

    def __call__(self, x: Any, *, train: bool = False) -> Any:
        if not train:
            return x * self.w
        keep = jax.random.bernoulli(self.make_rng("dropout"), 0.5, x.shape)
        return jnp.where(keep, x * self.w / 0.5, 0.0)


def test_dropout_key_changes_every_step_and_is_reproducible() -> None:
    module = Dropper()
    variables = fr.init_variables(module, jax.random.key(0))
    state = train.create_train_state(module, variables, optax.sgd(0.0), rng=7)

    def masks(model: Any, batch: Any) -> Any:
        out = model(batch)
        return jnp.sum(out), {"mask": out != 0}

    step = train.make_train_step(masks, donate=False)
    s1, m1 = step(state, jnp.ones(64))
    _, m2 = step(s1, jnp.ones(64))
    _, again = step(state, jnp.ones(64))
    assert not np.array_equal(m1["mask"], m2["mask"])
    np.testing.assert_array_equal(m1["mask"], again["mask"])
    other = train.create_train_state(module, variables, optax.sgd(0.0), rng=8)
    assert not np.array_equal(step(other, jnp.ones(64))[1]["mask"], m1["mask"])
    # eval: deterministic, no rng needed
    out = train.make_eval_step(lambda m, b: (jnp.sum(m(b)), {"o": m(b)}))(state, jnp.ones(64))
    np.testing.assert_array_equal(out["o"], np.ones(64))


def test_gradients_of_another_structure_are_refused() -> None:
    module = Toy()
    state = train.create_train_state(
        module, fr.init_variables(module, jax.random.key(0)), optax.sgd(0.1)
    )
    grads = {"weight": jnp.ones((3, 3)), "bias": jnp.ones(3), "other": jnp.ones(1)}
    with pytest.raises(ValueError, match=r"missing \['frozen'\], unexpected \['other'\]"):
        state.apply_gradients(grads)


def test_loss_must_be_scalar() -> None:
    module = Toy()
    state = train.create_train_state(
        module, fr.init_variables(module, jax.random.key(0)), optax.sgd(0.1)
    )
    step = train.make_train_step(lambda model, batch: model(batch), donate=False)
    with pytest.raises(TypeError, match=r"scalar loss .* shape \(2, 3\)"):
        step(state, X)


def test_call_kwargs_default_follows_the_module_signature() -> None:
    class NoTrain(fr.Module):
        def setup(self) -> None:
            self.register_parameter("w", fr.Parameter(jnp.ones(3)))

        def __call__(self, x: Any) -> Any:
            return x * self.w

    module = NoTrain()
    state = train.create_train_state(
        module, fr.init_variables(module, jax.random.key(0)), optax.sgd(0.1)
    )
    new, metrics = train.make_train_step(_mse, donate=False)(state, X)
    assert int(new.step) == 1 and np.isfinite(metrics["loss"])


def test_abstract_state_allocates_nothing() -> None:
    module = Net()
    abstract = train.create_train_state(module, fr.abstract_variables(module), train.torch_adamw())
    leaves = jax.tree.leaves(abstract)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), fr.abstract_variables(module))
    concrete = train.create_train_state(module, zeros, train.torch_adamw())
    fields = lambda s: (s.step, s.params, s.buffers, s.opt_state, s.rng)  # noqa: E731
    assert jax.tree.structure(fields(abstract)) == jax.tree.structure(fields(concrete))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            lambda: train.torch_sgd(0.1, momentum=0.0, nesterov=True),
            lambda p: torch.optim.SGD(p, 0.1, nesterov=True),
        ),
        (lambda: train.torch_sgd(-1.0), lambda p: torch.optim.SGD(p, -1.0)),
        (
            lambda: train.torch_sgd(0.1, momentum=-1.0),
            lambda p: torch.optim.SGD(p, 0.1, momentum=-1.0),
        ),
        (lambda: train.torch_adamw(eps=-1.0), lambda p: torch.optim.AdamW(p, eps=-1.0)),
        (
            lambda: train.torch_adamw(betas=(1.0, 0.9)),
            lambda p: torch.optim.AdamW(p, betas=(1.0, 0.9)),
        ),
        (
            lambda: train.torch_adam(weight_decay=-1.0),
            lambda p: torch.optim.Adam(p, weight_decay=-1.0),
        ),
    ],
)
def test_optimizer_argument_errors_use_pytorch_wording(ours: Any, theirs: Any) -> None:
    with pytest.raises(ValueError) as expected:
        theirs([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):
        ours()


def test_learning_rate_schedule_matches_a_pytorch_scheduler() -> None:
    schedule = lambda count: 0.1 * 0.5**count  # noqa: E731
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
    tx = train.torch_sgd(schedule, momentum=0.9, weight_decay=0.1)
    params = jnp.array([1.0, -2.0])
    opt_state = tx.init(params)
    for _ in range(4):
        opt.zero_grad()
        (p**3).sum().backward()
        opt.step()
        sched.step()
        updates, opt_state = tx.update(3 * params**2, opt_state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params, p.detach().numpy(), rtol=1e-6)
