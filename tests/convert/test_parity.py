"""Whole models: a PyTorch model's state_dict loaded into the same model written with standard
flax.linen layers computes the same outputs, and the flax variables exported back load
strictly into PyTorch and compute the flax outputs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flax_registry as fr
from flax_registry.convert import from_torch, to_torch
from tests.convert._helpers import assert_bit_identical, channels_first, channels_last, randomize
from tests.parity import TOL

T = torch.nn


def _perturb(variables: dict) -> dict:
    """New values everywhere (positive for variances), as after training in flax."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            jnp.abs(x) * 1.1 + 0.1 if "var" in jax.tree_util.keystr(path) else x * 0.9 + 0.01
        ),
        variables,
    )


# --- a CNN with BatchNorm: NCHW torch vs channels-last flax -----------------------------------


class TorchCNN(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = T.Sequential(
            T.Conv2d(3, 8, 3, padding=1),
            T.BatchNorm2d(8),
            T.ReLU(),
            T.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
            T.BatchNorm2d(8),
            T.ReLU(),
        )
        self.head = T.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class FlaxCNN(nn.Module):
    def setup(self) -> None:
        bn = dict(use_running_average=True, epsilon=1e-5)
        self.features = nn.Sequential(
            [
                nn.Conv(8, (3, 3), padding=1),
                nn.BatchNorm(**bn),
                nn.relu,
                nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=2),
                nn.BatchNorm(**bn),
                nn.relu,
            ]
        )
        self.head = nn.Dense(5)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x).mean((1, 2)))


def test_cnn_with_batchnorm_both_directions() -> None:
    torch_model = randomize(TorchCNN()).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    xf = jnp.asarray(channels_last(x.numpy()))
    model = FlaxCNN()
    variables, report = from_torch(model, torch_model.state_dict(), example_inputs=(xf,))
    assert report.ok and not report.casts
    assert [k for k, _ in report.dropped] == [
        "features.1.num_batches_tracked",
        "features.4.num_batches_tracked",
    ]
    assert set(variables) == {"params", "batch_stats"}
    # Layers assigned in setup() are typed from the bound module: an abstract tree suffices.
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), xf))
    same, _ = from_torch(model, torch_model.state_dict(), variables=abstract)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), same, variables))
    with torch.no_grad():
        expected = torch_model(x).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, xf)), expected, **TOL)
    # Flax -> torch: strict load into a fresh model, same outputs as flax.
    trained = _perturb(variables)
    fresh = TorchCNN().eval()
    fresh.load_state_dict(to_torch(model, trained, example_inputs=(xf,), as_torch=True))
    with torch.no_grad():
        np.testing.assert_allclose(fresh(x).numpy(), np.asarray(model.apply(trained, xf)), **TOL)
    assert int(fresh.features[1].num_batches_tracked) == 0  # synthesised, as documented


def test_cnn_conv_input_layout_is_channels_last() -> None:
    # The same model applied to NHWC input equals torch on NCHW input (outputs NC -> NC).
    torch_conv = randomize(T.Conv2d(3, 4, 3, padding=1))
    x = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    xf = jnp.asarray(channels_last(x.numpy()))
    variables, _ = from_torch(
        nn.Conv(4, (3, 3), padding=1), torch_conv.state_dict(), example_inputs=(xf,)
    )
    out = channels_first(nn.Conv(4, (3, 3), padding=1).apply(variables, xf))
    with torch.no_grad():
        np.testing.assert_allclose(out, torch_conv(x).numpy(), **TOL)


# --- a Transformer block: MultiHeadDotProductAttention vs torch MultiheadAttention ------------


class TorchBlock(T.Module):
    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.ln1 = T.LayerNorm(d)
        self.attn = T.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = T.LayerNorm(d)
        self.mlp = T.ModuleList([T.Linear(d, 4 * d), T.Linear(4 * d, d)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.ln2(x)
        return x + self.mlp[1](F.gelu(self.mlp[0](h)))


class FlaxBlock(nn.Module):
    """Compact, as most flax code is: layers exist only inside __call__."""

    d: int = 8
    heads: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.LayerNorm(epsilon=1e-5, name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h)
        h = nn.LayerNorm(epsilon=1e-5, name="ln2")(x)
        h = nn.Dense(4 * self.d, name="fc_in")(h)
        return x + nn.Dense(self.d, name="fc_out")(nn.gelu(h, approximate=False))


RENAMES = {r"^mlp\.0\.": "fc_in.", r"^mlp\.1\.": "fc_out."}


def test_transformer_block_both_directions() -> None:
    torch_model = randomize(TorchBlock(), scale=0.3).eval()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    xf = jnp.asarray(x.numpy())
    model = FlaxBlock()
    variables, report = from_torch(
        model, torch_model.state_dict(), example_inputs=(xf,), renames=RENAMES
    )
    assert report.ok
    assert ("mlp.0.weight", "fc_in.weight") in report.renamed
    with torch.no_grad():
        expected = torch_model(x).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, xf)), expected, **TOL)
    # Back to torch: the report undoes the renames; strict load; flax outputs.
    trained = _perturb(variables)
    fresh = TorchBlock().eval()
    sd = to_torch(model, trained, example_inputs=(xf,), report=report, as_torch=True)
    assert list(sd) == list(torch_model.state_dict())
    fresh.load_state_dict(sd)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(x).numpy(), np.asarray(model.apply(trained, xf)), **TOL)


def test_compact_model_needs_example_inputs() -> None:
    abstract = jax.eval_shape(lambda: FlaxBlock().init(jax.random.key(0), jnp.ones((1, 2, 8))))
    with pytest.raises(ValueError, match=r"created inside a compact __call__.*example_inputs"):
        from_torch(FlaxBlock(), TorchBlock().state_dict(), variables=abstract, renames=RENAMES)
    with pytest.raises(ValueError, match=r"FlaxBlock has no variables to convert.*example_inputs"):
        from_torch(FlaxBlock(), TorchBlock().state_dict())


# --- tied embeddings -------------------------------------------------------------------------


class TorchLM(T.Module):
    def __init__(self, vocab: int = 11, d: int = 6) -> None:
        super().__init__()
        self.emb = T.Embedding(vocab, d)
        self.norm = T.LayerNorm(d)
        self.head = T.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(ids)))


class FlaxLM(nn.Module):
    """Standard flax: the output layer reuses the embedding (`attend`)."""

    vocab: int = 11
    d: int = 6

    def setup(self) -> None:
        self.emb = nn.Embed(self.vocab, self.d)
        self.norm = nn.LayerNorm(epsilon=1e-5)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.emb.attend(self.norm(self.emb(ids)))


TIED = {"head.weight": "emb.weight"}


def test_tied_embeddings_standard_flax() -> None:
    torch_model = randomize(TorchLM())
    ids = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(0))
    model = FlaxLM()
    sd = torch_model.state_dict()
    variables, report = from_torch(model, sd, example_inputs=(jnp.asarray(ids.numpy()),), tied=TIED)
    assert report.ok and report.tied_aliases == [("head.weight", "emb.weight")]
    with torch.no_grad():
        expected = torch_model(ids).numpy()
    np.testing.assert_allclose(
        np.asarray(model.apply(variables, jnp.asarray(ids.numpy()))), expected, **TOL
    )
    # Either alias alone is enough; two different values are refused.
    only_head = {k: v for k, v in sd.items() if k != "emb.weight"}
    alone, _ = from_torch(model, only_head, example_inputs=(jnp.asarray(ids.numpy()),), tied=TIED)
    np.testing.assert_array_equal(
        alone["params"]["emb"]["embedding"], variables["params"]["emb"]["embedding"]
    )
    broken = {**sd, "head.weight": sd["head.weight"] + 1}
    with pytest.raises(
        ValueError, match="tied keys 'emb.weight' and 'head.weight'.*different values"
    ):
        from_torch(model, broken, example_inputs=(jnp.asarray(ids.numpy()),), tied=TIED)
    # Export: both keys, in torch's order; strict load into torch; flax outputs.
    trained = _perturb(variables)
    back = to_torch(
        model, trained, example_inputs=(jnp.asarray(ids.numpy()),), tied=TIED, as_torch=True
    )
    assert list(back) == list(sd) and back["head.weight"] is back["emb.weight"]
    fresh = TorchLM()
    fresh.load_state_dict(back)
    with torch.no_grad():
        np.testing.assert_allclose(
            fresh(ids).numpy(), np.asarray(model.apply(trained, jnp.asarray(ids.numpy()))), **TOL
        )


class RLinear(fr.Module):
    """A tiny registry Linear (torch names, torch layout)."""

    in_features: int
    out_features: int
    bias: bool = True

    def setup(self) -> None:
        init = nn.initializers.lecun_normal()
        self.register_parameter("weight", fr.Parameter(init, (self.out_features, self.in_features)))
        b = fr.Parameter(nn.initializers.zeros, (self.out_features,)) if self.bias else None
        self.register_parameter("bias", b)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.get_parameter("weight").T
        return y if not self.bias else y + self.get_parameter("bias")


class REmbedding(fr.Module):
    num: int
    dim: int

    def setup(self) -> None:
        self.register_parameter(
            "weight", fr.Parameter(nn.initializers.normal(1.0), (self.num, self.dim))
        )
        self.register_buffer("uses", jnp.zeros((), jnp.int32))
        self.register_buffer("scale", jnp.ones(()), persistent=False)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.weight[ids] * self.scale


class RegistryLM(fr.Module):
    def setup(self) -> None:
        self.emb = REmbedding(11, 6)
        self.head = RLinear(6, 11, bias=False)
        self.tie_parameters("head.weight", "emb.weight")

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.head(self.emb(ids))


class TorchRegistryLM(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = T.Embedding(11, 6)
        self.emb.register_buffer("uses", torch.tensor(5))
        self.emb.register_buffer("scale", torch.ones(()), persistent=False)
        self.head = T.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def test_tied_registry_module_round_trip_and_outputs() -> None:
    torch_model = randomize(TorchRegistryLM())
    sd = torch_model.state_dict()
    variables, report = from_torch(RegistryLM(), sd)  # setup-registered: no inputs needed
    assert report.tied_aliases == [("head.weight", "emb.weight")]
    assert report.skipped_nonpersistent == ["emb.scale"]
    assert report.casts == []  # 5 fits int32: an exact cast is not listed
    assert_bit_identical(to_torch(RegistryLM(), variables, report=report), sd)
    ids = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(0))
    out, _ = fr.apply(RegistryLM(), variables, jnp.asarray(ids.numpy()))
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(out), torch_model(ids).numpy(), **TOL)


# --- mixed trees: registry modules inside plain flax code and the other way round ------------


class Counter(fr.Module):
    """A registry layer with an integer buffer and a non-persistent buffer."""

    features: int

    def setup(self) -> None:
        self.register_parameter(
            "weight", fr.Parameter(nn.initializers.normal(1.0), (self.features,))
        )
        self.register_buffer("steps", jnp.zeros((), jnp.int32))
        self.register_buffer("scratch", jnp.zeros(2), persistent=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.weight


class RegistryBlock(fr.Module):
    def setup(self) -> None:
        self.fc = nn.Dense(3)
        self.parts = [nn.LayerNorm(), Counter(3)]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.parts[1](self.parts[0](self.fc(x)))


class PlainOuter(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Counter(5, name="gain")(nn.Dense(5, name="proj")(x))
        return RegistryBlock(name="block")(x)


class TorchCounter(T.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = T.Parameter(torch.randn(features))
        self.register_buffer("steps", torch.tensor(4))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class TorchOuter(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = T.Linear(4, 5)
        self.gain = TorchCounter(5)
        self.block = T.Module()
        self.block.fc = T.Linear(5, 3)
        self.block.parts = T.ModuleList([T.LayerNorm(3, eps=1e-6), TorchCounter(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gain(self.proj(x))
        return self.block.parts[1](self.block.parts[0](self.block.fc(x)))


def test_registry_modules_inside_plain_flax_and_back() -> None:
    torch_model = randomize(TorchOuter())
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    xf = jnp.asarray(x.numpy())
    sd = torch_model.state_dict()
    variables, report = from_torch(PlainOuter(), sd, example_inputs=(xf,))
    assert report.ok
    assert report.skipped_nonpersistent == ["gain.scratch", "block.parts.1.scratch"]
    assert int(variables["buffers"]["block"]["parts_1"]["steps"]) == 4
    out, _ = fr.apply(PlainOuter(), variables, xf)
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(out), torch_model(x).numpy(), **TOL)
    assert_bit_identical(to_torch(PlainOuter(), variables, example_inputs=(xf,), report=report), sd)
