"""The layout rules of JAX-style code on the NNX front-end: einsum-shaped kernels, a stacked
q/k/v projection and layers scanned with `nnx.vmap` / `nnx.scan` (every variable `(L, ...)`),
loaded from the PyTorch twin's state_dict with rules only, both directions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as T
from flax import nnx

import flax_registry as fr
from flax_registry.convert import Map, Rule, Scanned, Stacked, einsum_layout
from tests.convert._helpers import assert_bit_identical, randomize
from tests.parity import TOL

E, N, H, L = 8, 2, 4, 3


class Layer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        init = nnx.initializers.normal(0.1)
        self.qkv = nnx.Param(init(rngs.params(), (3, N, E, H)))
        self.o = nnx.Param(init(rngs.params(), (N, H, E)))

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = jnp.einsum("BTE,CNEH->CBTNH", x, self.qkv[...])
        w = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(H), axis=-1)
        return x + jnp.einsum("BTNH,NHE->BTE", jnp.einsum("BNTS,BSNH->BTNH", w, v), self.o[...])


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        make = nnx.vmap(lambda r: Layer(r), in_axes=0, out_axes=0)
        self.layers = make(nnx.Rngs(params=jax.random.split(rngs.params(), L)))

    def __call__(self, x: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(layer: Layer, h: jax.Array) -> jax.Array:
            return layer(h)

        return run(self.layers, x)


class TorchLayer(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (T.Linear(E, N * H, bias=False) for _ in range(3))
        self.o_proj = T.Linear(N * H, E, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            p(x).view(b, t, N, H).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        w = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(H), dim=-1)
        return x + self.o_proj((w @ v).transpose(1, 2).reshape(b, t, N * H))


class TorchModel(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = T.ModuleList([TorchLayer() for _ in range(L)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


Q = "BTE,NEH->BTNH"
RULES = {
    "layers": Scanned(),
    Layer: Rule(
        Stacked(
            ("q_proj.weight", "k_proj.weight", "v_proj.weight"), "qkv", layout=einsum_layout(Q)
        ),
        Map("o_proj.weight", "o", layout=einsum_layout("BTNH,NHE->BTE")),
    ),
}


def test_scanned_stacked_einsum_nnx_model_both_directions() -> None:
    twin = randomize(TorchModel(), scale=0.3).eval()
    model, report = fr.from_torch(Model(nnx.Rngs(0)), twin.state_dict(), rules=RULES)
    assert report.ok, report
    x = np.random.default_rng(0).standard_normal((2, 5, E)).astype(np.float32)
    with torch.no_grad():
        expected = twin(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), expected, **TOL)
    back = fr.to_torch(model, rules=RULES)
    assert_bit_identical(dict(sorted(back.items())), dict(sorted(twin.state_dict().items())))
    fresh = TorchModel()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
