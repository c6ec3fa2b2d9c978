"""Scanned layers: a decoder whose `nn.scan` keeps every variable as one `(L, ...)` array,
converted from its PyTorch twin's `layers.0` ... `layers.{L-1}`, both directions.

The flax model (`tests.convert._scanned_model`) is written as Gemma-style linen code writes it;
its twin is Hugging Face-style PyTorch. The rules are data (`RULES`, about 20 lines); no test
touches a tensor. From a sharded safetensors directory, each layer is read on its own and the
peak memory is the output plus one layer; on 8 simulated devices each device reads only its
layers (`_scanned_child`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flax_registry.convert import Scanned, _placement, from_torch, to_torch
from flax_registry.convert._source import Source
from flax_registry.io import save_safetensors
from tests.convert._decoder import Config, Decoder, forbid_reads, forward, run, twin
from tests.convert._helpers import assert_bit_identical, numpy_state
from tests.convert._scanned_model import ATTENTION, RULES, TIED, Attention, ScannedDecoder
from tests.parity import TOL

C = Config(layers=24)
ROOT = Path(__file__).resolve().parents[2]


def _ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, C.vocab, (2, 5))


@pytest.fixture(scope="module")
def torch_model() -> Any:
    return twin(C)


def _sorted(sd: dict[str, Any]) -> dict[str, Any]:
    return dict(sorted(numpy_state(sd).items()))


def test_scanned_decoder_from_its_twin_and_back(torch_model: Any) -> None:
    sd = torch_model.state_dict()
    model = ScannedDecoder(C)
    variables, report = from_torch(model, sd, example_inputs=(_ids(),), rules=RULES, tied=TIED)
    assert report.ok, report
    layers = variables["params"]["layers"]
    assert layers["attn"]["kv_einsum"]["w"].shape == (C.layers, 2, C.kv_heads, C.hidden, C.head_dim)
    assert layers["mlp"]["gating_einsum"].shape == (C.layers, 2, C.hidden, C.inter)
    ids = _ids(1)
    np.testing.assert_allclose(forward(model, variables, ids), run(torch_model, ids), **TOL)
    back = to_torch(model, variables, rules=RULES, tied=TIED, as_torch=True)
    Decoder(C).load_state_dict(back, strict=True)
    assert _sorted(back).keys() == _sorted(sd).keys()
    assert_bit_identical(_sorted(back), _sorted(sd))
    assert_bit_identical(to_torch(model, variables, rules=RULES, tied=TIED, report=report), sd)


def test_from_a_sharded_directory_one_layer_at_a_time(
    torch_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_safetensors(numpy_state(torch_model.state_dict()), tmp_path, max_shard_size="8KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    reads: list[tuple[str, int]] = []
    original = Source.read_slice

    def counting(self: Source, key: str, index: Any) -> np.ndarray:
        out = original(self, key, index)
        reads.append((key, out.size))
        return out

    monkeypatch.setattr(Source, "read_slice", counting)
    # The file path reads by rows: each piece's extent, its rows added up per key.
    keys: dict[int, str] = {}
    by_rows: dict[str, int] = {}
    extent, read_rows = _placement._extent, _placement.read_rows

    def planned(reader: Any, piece: Any) -> Any:
        found = extent(reader, piece)
        if found is not None:
            keys[id(found)] = piece.key
        return found

    def rows(found: Any, start: int, stop: int, out: np.ndarray) -> None:
        read_rows(found, start, stop, out)
        by_rows[keys[id(found)]] = by_rows.get(keys[id(found)], 0) + out.size

    def chunk(chunks: Any, found: Any, *args: Any) -> np.ndarray:
        out = read_chunk(chunks, found, *args)
        by_rows[keys[id(found)]] = by_rows.get(keys[id(found)], 0) + out.size
        return out

    read_chunk = _placement.RowChunks.read
    monkeypatch.setattr(_placement, "_extent", planned)
    monkeypatch.setattr(_placement, "read_rows", rows)
    monkeypatch.setattr(_placement.RowChunks, "read", chunk)
    model = ScannedDecoder(C, remat=True)  # nn.scan(nn.remat(Block)): rules follow the MRO
    variables, report = from_torch(
        model, tmp_path, example_inputs=(_ids(),), rules=RULES, tied=TIED
    )
    assert report.ok, report
    shapes = {k: v.size for k, v in numpy_state(torch_model.state_dict()).items()}
    # Every scanned key is read once, on its own: no read spans two layers.
    reads += list(by_rows.items())
    layer_reads = [(k, n) for k, n in reads if k.startswith("layers.")]
    assert sorted(k for k, _ in layer_reads) == sorted(k for k in shapes if k.startswith("layers."))
    assert all(n == shapes[k] for k, n in layer_reads)
    ids = _ids(2)
    np.testing.assert_allclose(forward(model, variables, ids), run(torch_model, ids), **TOL)
    assert_bit_identical(
        _sorted(to_torch(model, variables, rules=RULES, tied=TIED)),
        _sorted(torch_model.state_dict()),
    )


def test_inner_rules_by_path_pattern(torch_model: Any) -> None:
    """Inside the scan, a module's torch name has the literal `{i}`: `layers.*.self_attn`."""
    rules = {k: v for k, v in RULES.items() if k is not Attention} | {
        "layers.*.self_attn": ATTENTION
    }
    model = ScannedDecoder(C)
    sd = torch_model.state_dict()
    variables, report = from_torch(model, sd, example_inputs=(_ids(),), rules=rules, tied=TIED)
    assert report.ok
    assert_bit_identical(_sorted(to_torch(model, variables, rules=rules, tied=TIED)), _sorted(sd))


def test_peak_memory_is_the_output_plus_one_layer(tmp_path: Path) -> None:
    """24 layers of ~4 MB from a sharded safetensors directory, in a fresh process: the
    conversion's peak RSS above its start is at most the output plus one layer."""
    dims = ["24", "256", "1024", "8", "4", "32"]  # layers, hidden, inter, heads, kv heads, head dim
    layers, hidden, inter, heads, kv_heads, head_dim = map(int, dims)
    c = Config(layers, hidden, heads, kv_heads, head_dim, inter, vocab=64)
    save_safetensors(numpy_state(twin(c).state_dict()), tmp_path, max_shard_size="20MB")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.convert._scanned_child", "rss", str(tmp_path), *dims],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["output"] > 20 * measured["layer"]
    assert measured["extra"] <= measured["output"] + measured["layer"], measured


def test_on_8_devices_each_device_reads_its_layers(torch_model: Any, tmp_path: Path) -> None:
    save_safetensors(numpy_state(torch_model.state_dict()), tmp_path, max_shard_size="8KB")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_NUM_CPU_DEVICES": "8",
        "JAX_PLATFORMS": "cpu",
    }
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-m", "tests.convert._scanned_child", "devices", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("OK")


# --- wrong rules and checkpoints raise before any tensor is read -------------------------------


def _without(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k: v for k, v in sd.items() if not k.startswith(prefix)}


def test_missing_layer_index(torch_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = _without(_without(torch_model.state_dict(), "layers.5."), "layers.17.")
    forbid_reads(monkeypatch)
    with pytest.raises(RuntimeError) as info:
        from_torch(ScannedDecoder(C), sd, example_inputs=(_ids(),), rules=RULES, tied=TIED)
    message = str(info.value)
    assert 'Missing key(s) in state_dict: "layers.5.input_layernorm.weight"' in message
    expected = (
        "Scanned(torch='{i}', axis=0) at torch 'layers' holds 24 layers, but the checkpoint has "
        'no layer 5, 17 (no key under "layers.5.", "layers.17."); it has layers 0-4, 6-16, 18-23.'
    )
    assert expected in message, message
    with pytest.raises(
        ValueError, match=re.escape("is one array filled by 24 torch keys (Scanned(")
    ):
        from_torch(
            ScannedDecoder(C), sd, example_inputs=(_ids(),), rules=RULES, tied=TIED, strict=False
        )


def test_more_layers_in_the_checkpoint(torch_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = dict(torch_model.state_dict())
    sd |= {
        k.replace("layers.3.", "layers.24.", 1): v.clone()  # stored apart
        for k, v in sd.items()
        if k.startswith("layers.3.")
    }
    forbid_reads(monkeypatch)
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "holds 24 layers, but the checkpoint has layers up to 24 (unexpected keys under "
            '"layers.24."): build the flax scan with 25 layers.'
        ),
    ):
        from_torch(ScannedDecoder(C), sd, example_inputs=(_ids(),), rules=RULES, tied=TIED)


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (
            {k: v for k, v in RULES.items() if k != "layers"},
            "stacks 2 torch keys ['k_proj.weight', 'v_proj.weight'] on axis 0, but flax "
            "variable 'params/kv_einsum/w' has shape (24, 2, 2, 8, 2), whose axis 0 holds 24",
        ),
        (
            RULES | {"layers": Scanned(axis=1)},
            "the variables disagree on the number of layers (the length of axis 1): {4: "
            "['params/layers/attn/attn_vec_einsum/w (24, 4, 2, 8)'",
        ),
        (
            RULES | {"layers": Scanned(axis=2)},
            "'params/layers/pre_attention_norm/scale' has shape (24, 8), which has no axis 2",
        ),
        (
            RULES | {"layers": Scanned(torch="block")},
            "the torch name of layer i must contain '{i}'",
        ),
    ],
    ids=["no Scanned", "axis lengths", "no such axis", "no {i}"],
)
def test_wrong_scan_rule(
    torch_model: Any, monkeypatch: pytest.MonkeyPatch, rules: dict[Any, Any], expected: str
) -> None:
    sd = torch_model.state_dict()
    forbid_reads(monkeypatch)
    with pytest.raises(ValueError) as info:
        from_torch(ScannedDecoder(C), sd, example_inputs=(_ids(),), rules=rules, tied=TIED)
    assert expected in str(info.value), str(info.value)
    if rules.get("layers") is None:
        assert "declare the scanned module: rules={'<its torch name>': Scanned()}" in str(
            info.value
        )
