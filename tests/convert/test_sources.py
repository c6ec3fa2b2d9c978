"""Sources (dicts, safetensors, sharded safetensors, torch .pt/.bin), renames, strictness, the
report, dtype policies and user rules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flax_registry.convert import (
    LINEAR,
    Map,
    Rule,
    from_torch,
    register_rule,
    to_torch,
    unregister_rule,
)
from flax_registry.io import save_safetensors
from tests.convert._helpers import assert_bit_identical, numpy_state, randomize
from tests.parity import TOL

T = torch.nn


class TorchNet(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = T.Linear(4, 6)
        self.bn = T.BatchNorm1d(6)
        self.out = T.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.fc(x))))


class FlaxNet(nn.Module):
    def setup(self) -> None:
        self.fc = nn.Dense(6)
        self.bn = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
        self.out = nn.Dense(3)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nn.relu(self.bn(self.fc(x))))


X = jnp.ones((2, 4))


@pytest.fixture(scope="module")
def torch_net() -> TorchNet:
    return randomize(TorchNet()).eval()


@pytest.fixture(scope="module")
def reference(torch_net: TorchNet) -> dict[str, Any]:
    variables, _ = from_torch(FlaxNet(), torch_net.state_dict(), example_inputs=(X,))
    return variables


def _assert_same_variables(a: Any, b: Any) -> None:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes(), path


# --- every source kind gives the same variables -----------------------------------------------


def _write(kind: str, sd: dict[str, torch.Tensor], tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    if kind == "numpy":
        return numpy_state(sd), {}
    if kind == "jax":
        return {
            k: jnp.asarray(v.numpy()) if v.is_floating_point() else v.numpy() for k, v in sd.items()
        }, {}
    if kind == "safetensors":
        save_file(sd, tmp_path / "model.safetensors")
        return tmp_path / "model.safetensors", {}
    if kind == "sharded_safetensors":
        paths = save_safetensors(
            numpy_state(sd), tmp_path / "model.safetensors", max_shard_size=120
        )
        assert len(paths) > 2
        return tmp_path / "model.safetensors.index.json", {}
    if kind == "pt":
        torch.save(sd, tmp_path / "weights.pt")
        return str(tmp_path / "weights.pt"), {}
    if kind == "bin_directory":
        torch.save(sd, tmp_path / "pytorch_model.bin")
        return tmp_path, {}
    assert kind == "nested_pt"
    torch.save({"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pth")
    return tmp_path / "ckpt.pth", {"entry": "state_dict"}


@pytest.mark.parametrize(
    "kind",
    ["numpy", "jax", "safetensors", "sharded_safetensors", "pt", "bin_directory", "nested_pt"],
)
def test_every_source_kind(kind: str, torch_net: TorchNet, reference: Any, tmp_path: Path) -> None:
    source, kwargs = _write(kind, torch_net.state_dict(), tmp_path)
    variables, report = from_torch(FlaxNet(), source, example_inputs=(X,), **kwargs)
    assert report.ok
    assert report.dropped == [("bn.num_batches_tracked", report.dropped[0][1])]
    assert int(report.extras["bn.num_batches_tracked"]) == 7
    _assert_same_variables(variables, reference)
    with torch.no_grad():
        expected = torch_net(torch.ones(2, 4)).numpy()
    np.testing.assert_allclose(np.asarray(FlaxNet().apply(variables, X)), expected, **TOL)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_half_precision_files_keep_their_bits(
    fmt: str, torch_net: TorchNet, tmp_path: Path
) -> None:
    sd = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in torch_net.state_dict().items()
    }
    sd["fc.bias"] = sd["fc.bias"].to(torch.float16)
    path = tmp_path / f"half.{fmt}"
    save_file(sd, path) if fmt == "safetensors" else torch.save(sd, path)
    variables, report = from_torch(FlaxNet(), path, example_inputs=(X,), dtype="checkpoint")
    assert not report.casts
    assert variables["params"]["fc"]["bias"].dtype == jnp.float16
    assert variables["params"]["out"]["kernel"].dtype == jnp.bfloat16
    in_file_order = {k: sd[k] for k in report.source_order}  # safetensors sorts its keys
    assert_bit_identical(
        to_torch(FlaxNet(), variables, example_inputs=(X,), report=report), in_file_order
    )


def test_tensors_are_read_once_and_only_after_every_check(torch_net: TorchNet) -> None:
    reads: list[str] = []

    class Counting:
        def __init__(self, key: str, array: np.ndarray) -> None:
            self.key, self.array, self.shape, self.dtype = key, array, array.shape, array.dtype

        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            reads.append(self.key)
            return self.array

        def __getitem__(self, index: Any) -> np.ndarray:
            reads.append(self.key)
            return self.array[index]

    sd = numpy_state(torch_net.state_dict())
    source = {k: Counting(k, v) for k, v in sd.items()}
    from_torch(FlaxNet(), source, example_inputs=(X,))
    assert sorted(reads) == sorted(sd)  # each tensor once (num_batches_tracked: its value kept)
    reads.clear()
    bad = {**source, "out.bias": Counting("out.bias", np.zeros(4, np.float32))}
    with pytest.raises(RuntimeError, match="size mismatch for out.bias"):
        from_torch(FlaxNet(), bad, example_inputs=(X,))
    assert reads == ["bn.num_batches_tracked"]  # only the dropped scalar; no weight was read


# --- renames ---------------------------------------------------------------------------------


def test_renames_strip_a_dataparallel_prefix(torch_net: TorchNet, reference: Any) -> None:
    wrapped = {f"module.{k}": v for k, v in torch_net.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\n.*Unexpected.*\n.*renames="):
        from_torch(FlaxNet(), wrapped, example_inputs=(X,))
    for renames in ({r"^module\.": ""}, [(r"^module\.", "")], lambda k: k.removeprefix("module.")):
        variables, report = from_torch(FlaxNet(), wrapped, example_inputs=(X,), renames=renames)
        _assert_same_variables(variables, reference)
        assert ("module.fc.weight", "fc.weight") in report.renamed
        back = to_torch(FlaxNet(), variables, example_inputs=(X,), report=report)
        assert_bit_identical(back, wrapped)


def test_renames_returning_none_drop_keys(torch_net: TorchNet) -> None:
    sd = {**torch_net.state_dict(), "optimizer_step": torch.tensor(3)}
    rename = lambda k: None if k == "optimizer_step" else k  # noqa: E731
    _, report = from_torch(FlaxNet(), sd, example_inputs=(X,), renames=rename)
    assert ("optimizer_step", "renames returned None") in report.dropped


# --- strictness and the report ---------------------------------------------------------------


def _torch_error(module: T.Module, sd: dict[str, Any]) -> str:
    with pytest.raises(RuntimeError) as info:
        module.load_state_dict(sd, strict=True)
    return str(info.value)


def test_strict_errors_use_pytorch_wording(torch_net: TorchNet) -> None:
    sd = dict(torch_net.state_dict())
    del sd["fc.bias"]
    sd["extra.weight"] = torch.zeros(2)
    sd["out.weight"] = torch.zeros(3, 5)
    with pytest.raises(RuntimeError) as info:
        from_torch(FlaxNet(), sd, example_inputs=(X,))
    ours = str(info.value).split("\n\tHint")[0].replace("FlaxNet", "TorchNet")
    theirs = re.sub(r"torch\.Size\(\[([\d, ]*)\]\)", r"(\1)", _torch_error(TorchNet(), sd))
    assert ours == theirs


def test_non_strict_reports_and_never_leaves_abstract_leaves(torch_net: TorchNet) -> None:
    sd = dict(torch_net.state_dict())
    del sd["out.bias"]
    sd["out.weight"] = torch.zeros(3, 5)
    sd["unused"] = torch.zeros(1)
    with pytest.raises(
        RuntimeError,
        match=r'(?s)Missing key\(s\) in state_dict: "out.weight", "out.bias".*abstract',
    ):
        from_torch(FlaxNet(), sd, example_inputs=(X,), strict=False)
    concrete = FlaxNet().init(jax.random.key(1), X)
    variables, report = from_torch(
        FlaxNet(), sd, variables=concrete, example_inputs=(X,), strict=False
    )
    assert report.missing == ["out.bias"] and report.unexpected == ["unused"]
    assert report.shape_mismatches == [("out.weight", (3, 5), (3, 6))]
    assert not report.ok
    np.testing.assert_array_equal(
        variables["params"]["out"]["kernel"], concrete["params"]["out"]["kernel"]
    )
    np.testing.assert_array_equal(
        variables["params"]["fc"]["kernel"], torch_net.fc.weight.detach().numpy().T
    )
    text = str(report)
    for line in (
        "missing (1):",
        "    out.bias",
        "unexpected (1):",
        "out.weight: checkpoint (3, 5), model (3, 6)",
    ):
        assert line in text


def test_dtype_policies(torch_net: TorchNet) -> None:
    sd = torch_net.state_dict()
    v, r = from_torch(FlaxNet(), sd, example_inputs=(X,), dtype=jnp.bfloat16)
    assert (
        v["params"]["fc"]["kernel"].dtype == jnp.bfloat16
        and v["batch_stats"]["bn"]["mean"].dtype == jnp.bfloat16
    )
    assert ("fc.weight", "float32", "bfloat16") in r.casts
    v, r = from_torch(FlaxNet(), sd, example_inputs=(X,), dtype={"params": jnp.float16})
    assert (
        v["params"]["bn"]["scale"].dtype == jnp.float16
        and v["batch_stats"]["bn"]["var"].dtype == jnp.float32
    )
    v, r = from_torch(
        FlaxNet(),
        sd,
        example_inputs=(X,),
        dtype=lambda k, s, m: jnp.bfloat16 if k.startswith("out") else None,
    )
    assert (
        v["params"]["out"]["bias"].dtype == jnp.bfloat16
        and v["params"]["fc"]["bias"].dtype == jnp.float32
    )
    assert [k for k, _, _ in r.casts] == ["out.weight", "out.bias"]


# --- user rules ------------------------------------------------------------------------------


class Gated(nn.Module):
    """A user layer: kernel (in, out) and a per-output gain."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        gain = self.param("gain", nn.initializers.ones, (self.features,))
        return (x @ kernel) * gain


class TorchGated(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = T.Parameter(torch.randn(3, 4))
        self.g = T.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight.T) * self.g


GATED_RULE = Rule(Map("weight", "kernel", layout=LINEAR), Map("g", "gain"))


def test_custom_rule_registration() -> None:
    torch_layer = TorchGated()
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"no conversion rule for Gated.*register_rule\(Gated"):
        from_torch(Gated(3), torch_layer.state_dict(), example_inputs=(jnp.asarray(x.numpy()),))
    register_rule(Gated, GATED_RULE)
    try:
        variables, report = from_torch(
            Gated(3), torch_layer.state_dict(), example_inputs=(jnp.asarray(x.numpy()),)
        )
    finally:
        unregister_rule(Gated)
    assert report.ok
    with torch.no_grad():
        np.testing.assert_allclose(
            np.asarray(Gated(3).apply(variables, jnp.asarray(x.numpy()))),
            torch_layer(x).numpy(),
            **TOL,
        )
    back = to_torch(
        Gated(3), variables, example_inputs=(jnp.asarray(x.numpy()),), rules={Gated: GATED_RULE}
    )
    assert_bit_identical(back, torch_layer.state_dict())


def test_incomplete_rule_is_refused() -> None:
    rules = {Gated: Rule(Map("weight", "kernel", layout=LINEAR))}
    with pytest.raises(
        ValueError, match=r"maps no torch key to flax variable\(s\) \['params/gain'\]"
    ):
        from_torch(
            Gated(3), {"weight": np.zeros((3, 4), np.float32)}, example_inputs=(X,), rules=rules
        )


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="source must be a mapping"):
        from_torch(FlaxNet(), [1, 2], example_inputs=(X,))
    with pytest.raises(TypeError, match="bound"):
        from_torch(FlaxNet().bind({}), {}, example_inputs=(X,))
    with pytest.raises(KeyError, match="'nope' is not a key of FlaxNet"):
        from_torch(FlaxNet(), {}, example_inputs=(X,), tied={"x": "nope"})
    abstract = jax.eval_shape(lambda: FlaxNet().init(jax.random.key(0), X))
    with pytest.raises(ValueError, match="to_torch needs concrete variables"):
        to_torch(FlaxNet(), abstract, example_inputs=(X,))
