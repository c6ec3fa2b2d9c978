"""The traps a new user falls into when loading PyTorch weights, each against what PyTorch does:
a state dict without `num_batches_tracked`, fine-tuning with a new head from abstract
variables, and report noise for casts that change nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as T

import flax_registry as fr
from flax_registry import nn
from tests.convert._helpers import randomize
from tests.parity import TOL


class Net(fr.Module):
    classes: int = 5

    def setup(self) -> None:
        self.features = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.classifier = nn.Linear(8, self.classes)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return self.classifier(self.features(x, train=train))


class _TorchNet(T.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = T.Sequential(T.Linear(4, 8), T.BatchNorm1d(8), T.ReLU())
        self.classifier = T.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --- a state dict without num_batches_tracked --------------------------------------------------


def _without_counter(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def test_missing_counter_loads_as_in_torch_without_version_metadata() -> None:
    twin = _TorchNet(5).eval()
    randomize(twin)
    old = _without_counter(dict(twin.state_dict()))  # a hand-made dict: no _metadata
    fresh = _TorchNet(5)
    assert not fresh.load_state_dict(old, strict=True).missing_keys  # torch accepts it
    model = Net()
    for load in (
        lambda: fr.load_state_dict(model, fr.abstract_variables(model), old)[0],
        lambda: fr.from_torch(model, old)[0],
    ):
        variables = load()
        counter = fr.get_buffer(model, variables, "features.1.num_batches_tracked")
        assert int(counter) == int(fresh.features[1].num_batches_tracked) == 0
        np.testing.assert_array_equal(
            fr.get_buffer(model, variables, "features.1.running_mean"),
            twin.features[1].running_mean.numpy(),
        )
    _, report = fr.from_torch(model, old)
    assert report.ok and report.defaulted == ["features.1.num_batches_tracked"]
    # Concrete variables keep their current counter, as torch keeps the module's.
    concrete = fr.init_variables(model, jax.random.key(0))
    _, trained = fr.apply(model, concrete, jnp.ones((3, 4)), train=True)
    again, _ = fr.from_torch(model, old, variables=trained)
    assert int(fr.get_buffer(model, again, "features.1.num_batches_tracked")) == 1


def test_missing_counter_with_version_metadata_is_refused_as_in_torch() -> None:
    state = _TorchNet(5).state_dict()  # torch's own state dict records version 2
    del state["features.1.num_batches_tracked"]
    with pytest.raises(RuntimeError) as theirs:
        _TorchNet(5).load_state_dict(state)
    model = Net()
    with pytest.raises(RuntimeError) as ours:
        fr.load_state_dict(model, fr.abstract_variables(model), state)
    assert str(ours.value).replace("Net:", "_TorchNet:") == str(theirs.value)
    with pytest.raises(
        RuntimeError, match=r'Missing key\(s\) in state_dict: "features.1.num_batches'
    ):
        fr.from_torch(model, state)


def test_missing_counter_in_a_torch_save_file(tmp_path) -> None:
    path = tmp_path / "old.pt"
    torch.save(_without_counter(dict(_TorchNet(5).state_dict())), path)
    variables, report = fr.from_torch(Net(), path)
    assert report.defaulted == ["features.1.num_batches_tracked"]
    assert int(fr.get_buffer(Net(), variables, "features.1.num_batches_tracked")) == 0


# --- fine-tuning with a new head from abstract variables --------------------------------------


def test_new_head_is_initialised_only_where_asked() -> None:
    pretrained = _TorchNet(1000).eval()
    randomize(pretrained)
    model = Net(classes=3)  # a new head: 3 classes instead of 1000
    abstract = fr.abstract_variables(model)
    with pytest.raises(RuntimeError, match=r"size mismatch for classifier.weight"):
        fr.from_torch(model, pretrained.state_dict(), variables=abstract)
    with pytest.raises(RuntimeError, match=r"init="):  # strict=False says how
        fr.from_torch(
            model,
            {k: v for k, v in pretrained.state_dict().items() if "classifier" not in k},
            strict=False,
        )
    variables, report = fr.from_torch(
        model,
        pretrained.state_dict(),
        variables=abstract,
        init="classifier.*",
        init_rng=jax.random.key(7),
    )
    assert report.ok
    assert report.initialized == ["classifier.weight", "classifier.bias"]
    assert sorted(k for k, _ in report.dropped if "classifier" in k) == [
        "classifier.bias",
        "classifier.weight",
    ]
    # The head holds exactly what the model's own init gives for that key ...
    reference = fr.init_variables(model, jax.random.key(7))
    for key in ("classifier.weight", "classifier.bias"):
        np.testing.assert_array_equal(
            fr.get_parameter(model, variables, key), fr.get_parameter(model, reference, key)
        )
    # ... and the body the checkpoint, so the features agree with torch's.
    x = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    feats = fr.apply(model, variables, x, method=lambda m, x: m.features(x))[0]
    with torch.no_grad():
        np.testing.assert_allclose(
            np.asarray(feats), pretrained.features(torch.tensor(x)).numpy(), **TOL
        )


def test_init_pattern_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"init=\['head.\*'\] matches no torch key of Net"):
        fr.from_torch(Net(), _TorchNet(5).state_dict(), init="head.*")


# --- casts that change nothing are not listed -------------------------------------------------


def test_exact_integer_cast_is_not_report_noise() -> None:
    _, report = fr.from_torch(Net(), _TorchNet(5).state_dict())
    assert report.casts == [] and str(report).count("cast") == 0
    big = dict(_TorchNet(5).state_dict())
    big["features.1.num_batches_tracked"] = torch.tensor(2**40)
    if jax.config.jax_enable_x64:
        pytest.skip("with x64 the counter is int64: no cast")
    _, report = fr.from_torch(Net(), big)
    assert report.casts == [("features.1.num_batches_tracked", "int64", "int32")]


def test_report_speaks_pytorchs_incompatible_keys() -> None:
    state = dict(_TorchNet(5).state_dict())
    state["extra.weight"] = state.pop("classifier.bias")
    variables, report = fr.from_torch(
        Net(), state, strict=False, variables=fr.init_variables(Net(), jax.random.key(0))
    )
    theirs = _TorchNet(5).load_state_dict(state, strict=False)
    assert report.incompatible_keys == fr.IncompatibleKeys(
        theirs.missing_keys, theirs.unexpected_keys
    )
    assert report.missing_keys is report.missing and report.unexpected_keys == ["extra.weight"]
