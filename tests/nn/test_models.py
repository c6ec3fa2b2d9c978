"""Whole models against PyTorch: the torch definitions in `tests/nn/torch_models.py`, their
line-by-line ports in `tests/nn/fr_models.py`.

For every model, torch's `state_dict()` loads strictly into abstract variables with no renaming,
`fr.state_dict` lists the same keys in the same order with the same shapes, the parameter and
buffer listings (non-persistent buffers, tied weights) equal torch's, and eval-mode outputs
agree to 1e-5 in float32. The ResNet also runs one train-mode forward and backward (batch
statistics, updated running statistics and `num_batches_tracked`, parameter gradients); the GPT
checks that the tied output layer is one parameter whose gradient sums both uses.

Sizes are tiny; each forward is compiled once with `jax.jit` (faster than eager dispatch here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_registry as fr
from tests.frontends import Loaded, frontends
from tests.nn import fr_models, torch_models
from tests.parity import (
    assert_buffers_match,
    assert_close,
    assert_named_buffers_match,
    assert_state_dict_matches,
    to_numpy,
)

VOCAB, MAX_LEN = 20, 16


def images(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def tokens(seed: int = 0) -> np.ndarray:
    """(2, 7) token ids in [1, VOCAB); the first sequence ends with two padding tokens (0)."""
    ids = np.random.default_rng(seed).integers(1, VOCAB, (2, 7))
    ids[0, 5:] = 0
    return ids


def randomize_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give torch's constant-initialised tensors (biases, norm weights, BatchNorm running
    statistics and counters) random values, so that a swapped or ignored one shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                mean, var, count = m.running_mean, m.running_var, m.num_batches_tracked
                assert mean is not None and var is not None and count is not None
                mean.normal_(0.0, 0.3)
                var.uniform_(0.5, 1.5)
                count.fill_(5)
    return model


Case = tuple[torch.nn.Module, fr.Module, np.ndarray]

RESNET_WIDTHS = (8, 16, 32, 64)
TRANSFORMER = (VOCAB, 16, 2, 2, 3, MAX_LEN)  # vocab, d_model, nhead, num_layers, classes, max_len
LSTM = (VOCAB, 8, 6, 5)  # vocab, embed_dim, hidden, num_tags
GPT = (VOCAB, 16, 2, 2, MAX_LEN)  # vocab, d_model, nhead, num_layers, max_len

BUILDERS: dict[str, Callable[[], Case]] = {
    "resnet18": lambda: (
        torch_models.ResNet(widths=RESNET_WIDTHS, num_classes=10),
        fr_models.ResNet(widths=RESNET_WIDTHS, num_classes=10),
        images(4, 3, 64, 64),  # 64x64: layer4 sees 2x2 positions, 16 values per BN channel
    ),
    "mobilenet": lambda: (torch_models.MobileNet(), fr_models.MobileNet(), images(2, 3, 16, 16)),
    "unet": lambda: (torch_models.UNet(), fr_models.UNet(), images(2, 3, 16, 16)),
    "transformer": lambda: (
        torch_models.TransformerClassifier(*TRANSFORMER),
        fr_models.TransformerClassifier(*TRANSFORMER),
        tokens(),
    ),
    "lstm_tagger": lambda: (
        torch_models.LSTMTagger(*LSTM),
        fr_models.LSTMTagger(*LSTM),
        tokens(),
    ),
    "gpt": lambda: (torch_models.GPT(*GPT), fr_models.GPT(*GPT), tokens()),
}


@functools.cache
def loaded(name: str) -> tuple[torch.nn.Module, fr.Module, dict[str, Any], np.ndarray]:
    """The torch model (random weights, eval mode), its port with torch's state_dict loaded
    strictly into abstract variables (no random init, no renaming), and an input."""
    torch.manual_seed(0)
    theirs, ours, x = BUILDERS[name]()
    randomize_(theirs).eval()
    variables, report = fr.load_state_dict(
        ours, fr.abstract_variables(ours), theirs.state_dict(), strict=True
    )
    assert report.missing_keys == [] and report.unexpected_keys == []
    return theirs, ours, variables, x


@functools.cache
def eval_forward(name: str) -> Callable[..., Any]:
    ours = loaded(name)[1]
    return jax.jit(ours.apply)


MODELS = list(BUILDERS)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_loads_strictly_and_lists_torch_keys(name: str) -> None:
    theirs, ours, variables, _ = loaded(name)
    assert_state_dict_matches(ours, variables, theirs)  # keys, order, shapes, dtype kinds
    ours_sd = fr.state_dict(ours, variables)
    for key, value in theirs.state_dict().items():
        np.testing.assert_array_equal(np.asarray(ours_sd[key]), to_numpy(value), err_msg=key)
    # named_parameters drops tied duplicates; named_buffers includes non-persistent buffers
    assert [k for k, _ in fr.named_parameters(ours, variables)] == [
        k for k, _ in theirs.named_parameters()
    ]
    assert [k for k, _ in fr.named_buffers(ours, variables)] == [
        k for k, _ in theirs.named_buffers()
    ]


@pytest.mark.parametrize("name", MODELS)
@frontends
def test_eval_outputs_match_torch(name: str, frontend: str) -> None:
    theirs, ours, variables, x = loaded(name)
    with torch.no_grad():
        expected = theirs(torch.as_tensor(x))
    if frontend == "linen":
        actual = eval_forward(name)(variables, x)
    else:  # the whole model as one NNX module, loaded in place, in eval mode
        model = Loaded(frontend, ours, theirs)
        assert list(model.state_dict()) == list(theirs.state_dict())
        actual = model(x)
    assert actual.shape == tuple(expected.shape)
    assert_close(actual, expected)


def test_resnet_has_torchvision_names() -> None:
    theirs, ours, variables, _ = loaded("resnet18")
    keys = list(fr.state_dict(ours, variables))
    for key in (
        "conv1.weight",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.running_var",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.num_batches_tracked",
        "layer4.1.bn2.bias",
        "fc.weight",
    ):
        assert key in keys
    assert not any(k.startswith("layer1.0.downsample") for k in keys)  # same width, stride 1


def param_grads(module: fr.Module, variables: dict[str, Any], grads: Any) -> dict[str, Any]:
    """Gradients (a params-shaped tree) under their torch parameter names."""
    return dict(fr.named_parameters(module, {**variables, "params": grads}))


def assert_grad_close(actual: Any, expected: Any, key: str, tol: float = 1e-4) -> None:
    """Normwise: `max|actual - expected| <= tol * max|expected|`. Gradients through train-mode
    BatchNorm over few values per channel are ill-conditioned in float32: elementwise, torch's
    own float32 gradients may differ from its float64 ones by 1e-2 relative where terms cancel,
    but normwise they stay close; a wrong formula (a biased variance, a missing term) is off by
    far more."""
    a, e = np.asarray(actual, np.float64), to_numpy(expected).astype(np.float64)
    assert a.shape == e.shape, key
    error, scale = np.abs(a - e).max(), np.abs(e).max()
    assert error <= tol * scale + 1e-6, f"{key}: max error {error:.3g}, max |grad| {scale:.3g}"


def torch_backward(theirs: torch.nn.Module, x: np.ndarray, seed: int = 2) -> tuple[Any, Any]:
    """torch's output and the cotangent used for `sum(output * cot).backward()`."""
    theirs.zero_grad()
    out = theirs(torch.as_tensor(x))
    cot = np.random.default_rng(seed).standard_normal(tuple(out.shape)).astype(np.float32)
    (out * torch.as_tensor(cot)).sum().backward()
    return out, cot


@frontends
def test_resnet_train_forward_matches_torch_outputs_buffers_and_grads(frontend: str) -> None:
    source, ours, variables, x = loaded("resnet18")
    theirs = torch_models.ResNet(widths=RESNET_WIDTHS, num_classes=10)  # a copy to train
    theirs.load_state_dict(source.state_dict())
    theirs.train()
    expected, cot = torch_backward(theirs, x)
    if frontend == "nnx":  # nnx.value_and_grad, buffers updated in place
        model = Loaded(frontend, ours, source)
        out, _, nnx_grads = model.value_and_grads(lambda y: jnp.sum(y * cot), x, train=True)
        assert_close(out, expected.detach())
        assert_named_buffers_match(model.named_buffers(), theirs)
        for key, p in theirs.named_parameters():
            assert_grad_close(nnx_grads[key], p.grad, key)
        return

    def loss(params: Any, rest: dict[str, Any], x: Any) -> Any:
        out, new = fr.apply(ours, {**rest, "params": params}, x, train=True)
        return jnp.sum(out * cot), (out, new)

    rest = {k: v for k, v in variables.items() if k != "params"}
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, (out, new_variables)), grads = step(variables["params"], rest, x)

    assert_close(out, expected.detach())
    assert_buffers_match(ours, new_variables, theirs)  # running stats; counters exactly (6)
    assert int(fr.get_buffer(ours, new_variables, "layer3.0.bn1.num_batches_tracked")) == 6
    assert_state_dict_matches(ours, new_variables, theirs)
    ours_grads = param_grads(ours, variables, grads)
    for key, p in theirs.named_parameters():
        assert_grad_close(ours_grads[key], p.grad, key)


def test_gpt_output_layer_is_the_embedding_and_gets_both_gradients() -> None:
    theirs, ours, variables, x = loaded("gpt")
    assert isinstance(theirs, torch_models.GPT)
    assert "lm_head.weight" not in dict(fr.named_parameters(ours, variables))
    sd = fr.state_dict(ours, variables)
    np.testing.assert_array_equal(
        np.asarray(sd["lm_head.weight"]), np.asarray(sd["tok_emb.weight"])
    )
    assert theirs.lm_head.weight is theirs.tok_emb.weight
    _, cot = torch_backward(theirs, x)

    def loss(params: Any) -> Any:
        return jnp.sum(ours.apply({**variables, "params": params}, x) * cot)

    grads = param_grads(ours, variables, jax.grad(loss)(variables["params"]))
    # torch accumulates the embedding-lookup and the output-layer gradients in one .grad
    for key, p in theirs.named_parameters():
        assert_grad_close(grads[key], p.grad, key, tol=1e-5)


def test_gpt_conflicting_tied_values_load_as_torch_loads_them() -> None:
    """A state_dict whose `lm_head.weight` differs from `tok_emb.weight` (it cannot come from
    the tied torch model): torch copies both keys into the one tensor, so the later key,
    `lm_head.weight`, wins; the port must end with the same tensor under both names."""
    theirs, ours, _, _ = loaded("gpt")
    sd = {k: v.clone() for k, v in theirs.state_dict().items()}
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    twin = torch_models.GPT(*GPT)
    twin.load_state_dict(sd)
    variables, _ = fr.load_state_dict(ours, fr.abstract_variables(ours), sd, strict=True)
    ours_sd = fr.state_dict(ours, variables)
    for key in ("tok_emb.weight", "lm_head.weight"):
        np.testing.assert_array_equal(np.asarray(ours_sd[key]), to_numpy(twin.state_dict()[key]))
