"""Models written with plain `flax.nnx` layers (no flax_registry base class) load their PyTorch
twins' state_dicts through `from_torch` and export back through `to_torch` into a strict
PyTorch load, with the outputs of the twin."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as T
from flax import nnx

import flax_registry as fr
from tests.convert._helpers import assert_bit_identical, randomize
from tests.parity import TOL

# --- a small ResNet: convolutions, BatchNorm, a residual block, a list of blocks ---------------


class Block(nnx.Module):
    def __init__(self, c: int, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(c, c, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.conv2 = nnx.Conv(c, c, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(x + self.bn2(self.conv2(h)))


class ResNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.stem = nnx.Conv(3, 8, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.layers = nnx.List([Block(8, rngs) for _ in range(2)])
        self.fc = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.stem(x)))
        for block in self.layers:
            x = block(x)
        return self.fc(x.mean((1, 2)))


class TorchBlock(T.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = T.Conv2d(c, c, 3, padding=1, bias=False), T.BatchNorm2d(c)
        self.conv2, self.bn2 = T.Conv2d(c, c, 3, padding=1, bias=False), T.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class TorchResNet(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = T.Conv2d(3, 8, 3, stride=2, padding=1), T.BatchNorm2d(8)
        self.layers = T.ModuleList([TorchBlock(8) for _ in range(2)])
        self.fc = T.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        for block in self.layers:
            x = block(x)
        return self.fc(x.mean((2, 3)))


# --- a small transformer: embedding, nnx.MultiHeadAttention, LayerNorm, MLP -------------------


class Encoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(11, 16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=4, in_features=16, decode=False, deterministic=True, rngs=rngs
        )
        self.norm1 = nnx.LayerNorm(16, epsilon=1e-5, rngs=rngs)
        self.up = nnx.Linear(16, 24, rngs=rngs)
        self.down = nnx.Linear(24, 16, rngs=rngs)
        self.norm2 = nnx.LayerNorm(16, epsilon=1e-5, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids)
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.down(nnx.relu(self.up(x))))


class TorchEncoder(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = T.Embedding(11, 16)
        self.attn = T.MultiheadAttention(16, 4, batch_first=True)
        self.norm1 = T.LayerNorm(16)
        self.up, self.down = T.Linear(16, 24), T.Linear(24, 16)
        self.norm2 = T.LayerNorm(16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.down(torch.relu(self.up(x))))


def _resnet_input() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    return x, np.moveaxis(x, 1, -1)  # torch NCHW, flax NHWC


@pytest.mark.parametrize("abstract", [False, True])
def test_plain_nnx_resnet_both_directions(abstract: bool) -> None:
    twin = randomize(TorchResNet()).eval()
    make = lambda: ResNet(nnx.Rngs(0))  # noqa: E731
    model = fr.nnx.eval_shape(make) if abstract else make()
    model, report = fr.from_torch(model, twin.state_dict())
    assert report.ok
    assert [k for k, _ in report.dropped] == [
        k for k in twin.state_dict() if k.endswith("num_batches_tracked")
    ]
    model.eval()
    x, x_nhwc = _resnet_input()
    with torch.no_grad():
        expected = twin(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x_nhwc))), expected, **TOL)
    back = fr.to_torch(model, report=report)
    assert_bit_identical(back, twin.state_dict())
    fresh = TorchResNet().eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(torch.tensor(x)).numpy(), expected, **TOL)


def test_plain_nnx_transformer_both_directions() -> None:
    twin = randomize(TorchEncoder(), scale=0.3).eval()
    model, report = fr.from_torch(Encoder(nnx.Rngs(0)), twin.state_dict())
    assert report.ok and "attn.in_proj_weight" in twin.state_dict()
    ids = np.random.default_rng(0).integers(0, 11, (2, 5))
    with torch.no_grad():
        expected = twin(torch.tensor(ids)).numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, **TOL)
    back = fr.to_torch(model, as_torch=True)
    fresh = TorchEncoder().eval()
    fresh.load_state_dict(back, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(torch.tensor(ids)).numpy(), expected, **TOL)
    assert_bit_identical(fr.to_torch(model), twin.state_dict())


def test_plain_nnx_listing_names_its_own_variables() -> None:
    """`state_dict` lists the model as it is (NNX names: `fc.kernel`), `to_torch` the twin's."""
    model = ResNet(nnx.Rngs(0))
    names = list(fr.state_dict(model))
    assert names[:4] == ["stem.kernel", "stem.bias", "bn.scale", "bn.bias"]
    assert "layers.0.conv1.kernel" in names and "bn.mean" in names
    assert list(fr.to_torch(model))[:4] == ["stem.weight", "stem.bias", "bn.weight", "bn.bias"]


class Custom(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.cls_token = nnx.Param(jnp.zeros((1, 1, 6)))
        self.proj = nnx.Linear(4, 6, rngs=rngs)
        self.mix = nnx.Param(jnp.zeros((6, 6)))


def test_raw_params_follow_the_linen_policy() -> None:
    class TorchCustom(T.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = T.Parameter(torch.randn(1, 1, 6))
            self.proj = T.Linear(4, 6)
            self.mix = T.Parameter(torch.randn(6, 6))

    with pytest.raises(ValueError, match=r"'params/mix' of Custom .* two axes of the same length"):
        fr.from_torch(Custom(nnx.Rngs(0)), TorchCustom().state_dict())
    rules = {
        Custom: fr.convert.Rule(
            fr.convert.Map("mix", "mix"), fr.convert.Map("cls_token", "cls_token")
        )
    }
    twin = TorchCustom()
    model, report = fr.from_torch(Custom(nnx.Rngs(0)), twin.state_dict(), rules=rules)
    assert report.ok
    np.testing.assert_array_equal(np.asarray(model.mix.get_value()), twin.mix.detach().numpy())


def test_new_head_of_an_nnx_model_keeps_its_constructed_values() -> None:
    """`init=` on NNX: the head keeps what the constructor made; the body loads."""
    twin = randomize(TorchResNet()).eval()
    state = {k: v for k, v in twin.state_dict().items() if not k.startswith("fc.")}
    state["fc.weight"] = torch.zeros(5, 8)  # a pretrained head to be replaced
    model = ResNet(nnx.Rngs(3))
    head = np.asarray(model.fc.kernel.get_value())
    model, report = fr.from_torch(model, state, init="fc.*", strict=False)
    assert report.initialized == ["fc.weight", "fc.bias"]
    np.testing.assert_array_equal(np.asarray(model.fc.kernel.get_value()), head)
    np.testing.assert_array_equal(
        np.asarray(model.stem.kernel.get_value()),
        np.transpose(twin.stem.weight.detach().numpy(), (2, 3, 1, 0)),
    )
    with pytest.raises(ValueError, match="the model is abstract"):
        fr.from_torch(
            fr.nnx.eval_shape(lambda: ResNet(nnx.Rngs(0))), state, init="fc.*", strict=False
        )
