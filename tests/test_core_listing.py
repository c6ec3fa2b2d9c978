"""The same modules in PyTorch and flax_registry list the same names, in the same order."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_registry as fr
from tests.parity import to_numpy


# --- a small model, written twice ---------------------------------------------------------------
class TorchLeaf(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_parameter("weight", torch.nn.Parameter(torch.randn(n, n)))
        self.register_parameter("bias", None)
        self.register_buffer("mask", torch.ones(n), persistent=False)
        self.plain = torch.ones(n)  # neither parameter nor buffer
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T * self.mask


class Leaf(fr.Module):
    n: int

    def setup(self) -> None:
        self.register_buffer("running_mean", jnp.zeros(self.n))
        self.register_parameter(
            "weight", fr.Parameter(nn.initializers.normal(1.0), (self.n, self.n))
        )
        self.register_parameter("bias", None)
        self.register_buffer("mask", jnp.ones(self.n), persistent=False)
        self.plain = jnp.ones(self.n)
        self.register_buffer("count", jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.weight.T * self.mask


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = TorchLeaf(3)
        self.register_parameter("scale", torch.nn.Parameter(torch.randn(3)))
        self.decoder = self.encoder  # a shared submodule: one module, two names
        self.heads = torch.nn.ModuleList([TorchLeaf(3), TorchLeaf(3)])
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads[1](self.decoder(self.encoder(x))) * self.scale


class Net(fr.Module):
    def setup(self) -> None:
        self.encoder = Leaf(3)
        self.register_parameter("scale", fr.Parameter(nn.initializers.normal(1.0), (3,)))
        self.decoder = self.encoder
        self.heads = [Leaf(3), Leaf(3)]
        self.register_buffer("step", jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.heads[1](self.decoder(self.encoder(x))) * self.scale


@pytest.fixture(scope="module")
def models() -> tuple[TorchNet, Net, dict]:
    torch.manual_seed(0)
    tnet, net = TorchNet(), Net()
    variables = fr.init_variables(net, jax.random.key(0))
    variables, _ = fr.load_state_dict(net, variables, tnet.state_dict())
    return tnet, net, variables


def names(pairs) -> list[str]:
    return [name for name, _ in pairs]


@pytest.mark.parametrize("prefix", ["", "model"])
@pytest.mark.parametrize("remove_duplicate", [True, False])
def test_named_parameters_and_buffers_match_torch(models, prefix, remove_duplicate):
    tnet, net, v = models
    for fn in ("named_parameters", "named_buffers"):
        ours = getattr(fr, fn)(net, v, prefix=prefix, remove_duplicate=remove_duplicate)
        theirs = getattr(tnet, fn)(prefix=prefix, remove_duplicate=remove_duplicate)
        ours, theirs = list(ours), list(theirs)
        assert names(ours) == names(theirs)
        for (_, a), (_, b) in zip(ours, theirs):
            np.testing.assert_array_equal(np.asarray(a), to_numpy(b))


def test_recurse_false_lists_own_tensors_only(models):
    tnet, net, v = models
    assert names(fr.named_parameters(net, v, recurse=False)) == names(
        tnet.named_parameters(recurse=False)
    )
    assert names(fr.named_buffers(net, v, recurse=False)) == names(
        tnet.named_buffers(recurse=False)
    )


@pytest.mark.parametrize("remove_duplicate", [True, False])
def test_named_modules_match_torch_except_containers(models, remove_duplicate):
    tnet, net, v = models
    ours = names(fr.named_modules(net, v, prefix="m", remove_duplicate=remove_duplicate))
    # A plain list attribute has no container module of its own (torch's ModuleList does).
    theirs = [n for n, _ in tnet.named_modules(prefix="m", remove_duplicate=remove_duplicate)]
    assert ours == [n for n in theirs if n != "m.heads"]


def test_state_dict_matches_torch(models):
    tnet, net, v = models
    ours, theirs = fr.state_dict(net, v), tnet.state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert tuple(ours[key].shape) == tuple(theirs[key].shape)
        np.testing.assert_array_equal(np.asarray(ours[key]), to_numpy(theirs[key]))
    assert list(fr.state_dict(net, v)) == list(net.bind(v).state_dict())


def test_forward_matches_torch_after_load(models):
    tnet, net, v = models
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(net.apply(v, x)), tnet(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-5
    )


def test_parameters_and_buffers_values(models):
    tnet, net, v = models
    assert [a.shape for a in fr.parameters(net, v)] == [tuple(p.shape) for p in tnet.parameters()]
    assert [a.shape for a in fr.buffers(net, v)] == [tuple(b.shape) for b in tnet.buffers()]


def test_get_parameter_buffer_submodule(models):
    tnet, net, v = models
    np.testing.assert_array_equal(
        np.asarray(fr.get_parameter(net, v, "heads.1.weight")),
        to_numpy(tnet.get_parameter("heads.1.weight")),
    )
    np.testing.assert_array_equal(
        np.asarray(fr.get_buffer(net, v, "encoder.mask")), to_numpy(tnet.get_buffer("encoder.mask"))
    )
    assert isinstance(fr.get_submodule(net, v, "heads.0"), Leaf)
    bound = net.bind(v)
    assert isinstance(bound.get_submodule("decoder"), Leaf)
    for target, getter in [("encoder.nope", "get_parameter"), ("nope.weight", "get_buffer")]:
        with pytest.raises(AttributeError) as ours:
            getattr(bound, getter)(target)
        with pytest.raises(AttributeError) as theirs:
            getattr(tnet, getter)(target)
        assert str(ours.value) == str(theirs.value).replace("TorchNet", "Net").replace(
            "TorchLeaf", "Leaf"
        )


def test_non_strict_load_reports_like_torch(models):
    tnet, net, v = models
    sd = dict(tnet.state_dict())
    del sd["encoder.weight"], sd["heads.0.count"]
    sd["extra.weight"] = torch.zeros(2)
    sd["encoder.mask"] = torch.zeros(3)  # non-persistent: unexpected in torch too
    theirs = TorchNet().load_state_dict(sd, strict=False)
    _, ours = fr.load_state_dict(net, v, sd, strict=False)
    assert ours.missing_keys == theirs.missing_keys
    assert ours.unexpected_keys == theirs.unexpected_keys
    _, ok = fr.load_state_dict(net, v, tnet.state_dict())
    assert (
        repr(ok)
        == repr(tnet.load_state_dict(tnet.state_dict()))
        == "<All keys matched successfully>"
    )


def test_order_survives_jit_tree_map_and_optax(models):
    import optax

    _, net, v = models
    expected = list(fr.state_dict(net, v))
    jitted = jax.jit(lambda t: t)(v)
    mapped = jax.tree.map(lambda x: x, v)
    tx = optax.adam(1e-3)
    updates, _ = tx.update(
        jax.tree.map(jnp.ones_like, v["params"]), tx.init(v["params"]), v["params"]
    )
    stepped = {**v, "params": optax.apply_updates(v["params"], updates)}
    for tree in (jitted, mapped, stepped):
        assert list(fr.state_dict(net, tree)) == expected


def test_listing_and_loading_need_no_inputs():
    net = Net()
    abstract = fr.abstract_variables(net)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    assert list(fr.state_dict(net, abstract)) == list(TorchNet().state_dict())
    loaded, _ = fr.load_state_dict(net, abstract, TorchNet().state_dict())
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded))


def test_flax_layers_as_submodules():
    class TorchMixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.leaf = TorchLeaf(2)

    class Mixed(fr.Module):
        def setup(self) -> None:
            self.leaf = Leaf(2)
            self.dense = nn.Dense(4)
            self.bn = nn.BatchNorm(use_running_average=True)

        def __call__(self, x):
            return self.bn(self.dense(self.leaf(x)))

    model = Mixed()
    v = model.init(jax.random.key(0), jnp.ones((1, 2)))
    v = jax.jit(lambda t: t)(v)  # sorted keys: the order must still be flax's definition order
    assert names(fr.named_parameters(model, v)) == [
        "leaf.weight",
        "dense.kernel",
        "dense.bias",
        "bn.scale",
        "bn.bias",
    ]
    assert names(fr.named_buffers(model, v)) == [
        "leaf.running_mean",
        "leaf.mask",
        "leaf.count",
        "bn.mean",
        "bn.var",
    ]
    assert list(fr.state_dict(model, v))[:3] == list(TorchMixed().state_dict())


def test_tied_parameters_listed_once_saved_twice():
    class TorchTied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

    class Emb(fr.Module):
        def setup(self):
            self.register_parameter("weight", fr.Parameter(nn.initializers.normal(1.0), (5, 3)))

    class Head(fr.Module):
        def setup(self):
            self.register_parameter("weight", fr.Parameter(nn.initializers.normal(1.0), (5, 3)))

        def __call__(self, x):
            return x @ self.weight.T

    class Tied(fr.Module):
        def setup(self):
            self.emb = Emb()
            self.head = Head()
            self.tie_parameters("head.weight", "emb.weight")

        def __call__(self, ids):
            return self.head(self.emb.weight[ids])

    tmodel, model = TorchTied(), Tied()
    v, _ = fr.load_state_dict(
        model, fr.init_variables(model, jax.random.key(0)), tmodel.state_dict()
    )
    assert [x.shape for x in jax.tree.leaves(v)] == [(5, 3)]  # one variable
    assert names(fr.named_parameters(model, v)) == names(tmodel.named_parameters())
    assert names(fr.named_parameters(model, v, remove_duplicate=False)) == names(
        tmodel.named_parameters(remove_duplicate=False)
    )
    assert list(fr.state_dict(model, v)) == list(tmodel.state_dict())
    grads = jax.grad(lambda p: model.apply({"params": p}, jnp.array([1, 2])).sum())(v["params"])
    tmodel.head(tmodel.emb(torch.tensor([1, 2]))).sum().backward()
    np.testing.assert_allclose(
        grads["emb"]["weight"], tmodel.emb.weight.grad.numpy(), rtol=1e-5, atol=1e-6
    )


def test_underscore_attributes_are_children_too():
    class TorchPrivate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._inner = TorchLeaf(2)
            self._cache = torch.ones(2)  # a plain tensor attribute: nothing

    class Private(fr.Module):
        def setup(self) -> None:
            self._inner = Leaf(2)
            self._cache = jnp.ones(2)

    v = fr.init_variables(Private(), jax.random.key(0))
    assert list(fr.state_dict(Private(), v)) == list(TorchPrivate().state_dict())
    assert names(fr.named_modules(Private(), v)) == names(TorchPrivate().named_modules())
