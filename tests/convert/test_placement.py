"""`from_torch` from a checkpoint file: the row-read placement (`convert._placement`) gives the
bits the mapped-view placement gives, for every layout a rule produces (transposes, flips,
merges, fused tensors), casts, formats (safetensors, torch zip, sharded indexes) and any cut of
the tensors into chunks; and the bits torch wrote."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import flax_registry as fr
from flax_registry import nn
from flax_registry.convert import _placement, _sharding


class Mixed(linen.Module):
    """Every layout the builtin rules have: Linear (transpose), Conv (4-D permute),
    ConvTranspose (permute and flip), DenseGeneral (merge), attention (fused along axis 0,
    heads split), norms and embeddings (identity), batch statistics (buffers)."""

    @linen.compact
    def __call__(self, ids: jax.Array, image: jax.Array) -> Any:
        x = linen.Embed(50, 12, name="embed")(ids)
        x = linen.MultiHeadDotProductAttention(num_heads=3, name="attn")(x)
        x = linen.LayerNorm(name="norm")(x)
        x = linen.DenseGeneral((2, 6), name="general")(x).reshape(x.shape)
        x = linen.Dense(7, name="dense")(x)
        y = linen.Conv(5, (3, 3), name="conv")(image)
        y = linen.ConvTranspose(4, (2, 3), name="deconv")(y)
        y = linen.BatchNorm(use_running_average=True, name="bn")(y)
        return x.sum() + y.sum()


class Registry(fr.Module):
    """flax_registry layers: torch's own layouts, bf16 and int buffers included."""

    def setup(self) -> None:
        self.fc = nn.Linear(9, 33)
        self.bn = nn.BatchNorm1d(33)
        self.emb = nn.Embedding(17, 5, dtype=jnp.bfloat16)


def _inputs() -> tuple[jax.Array, jax.Array]:
    return jnp.zeros((2, 4), jnp.int32), jnp.zeros((1, 6, 7, 2))


def _torch_state(module: Any, seed: int) -> dict[str, torch.Tensor]:
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), fr.abstract_variables(module))
    return _random_like(fr.to_torch(module, zeros, as_torch=True), seed)


def _random_like(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in state.items():
        if t.is_floating_point():
            t = torch.randn(t.shape, generator=g).to(t.dtype)
        out[key] = t.contiguous()
    return out


def _write(directory: Path, fmt: str, state: dict[str, torch.Tensor]) -> Path:
    if fmt == "safetensors":
        save_file(state, str(directory / "model.safetensors"))
        return directory / "model.safetensors"
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
        return directory / "pytorch_model.bin"
    keys = list(state)
    shards = {f"model-{i + 1:05d}-of-00003.{fmt}": keys[i::3] for i in range(3)}
    for name, part in shards.items():
        if fmt == "safetensors-index":
            save_file({k: state[k] for k in part}, str(directory / name))
        else:
            torch.save({k: state[k] for k in part}, directory / name)
    index = directory / "model.index.json"
    weight_map = {k: name for name, part in shards.items() for k in part}
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _mapped_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sharding, "place_from_file", lambda *args: False)


def _leaves(tree: Any) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        arr = np.asarray(leaf)
        out.append((jax.tree_util.keystr(path), str(arr.dtype), arr.shape, arr.tobytes()))
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


@pytest.fixture(scope="module")
def mixed() -> tuple[Mixed, Any, dict[str, torch.Tensor]]:
    model, example = Mixed(), _inputs()
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *example))
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)  # no XLA compile
    state = _random_like(fr.to_torch(model, zeros, as_torch=True, example_inputs=example), 0)
    return model, abstract, state  # the layer types are remembered for `model` from here on


@pytest.mark.parametrize(
    "chunk, rows, streamed",
    [(None, None, False), (40, None, False), (None, 3, False), (40, None, True)],
    ids=["default", "tiny-chunks", "3-rows", "streamed"],
)
def test_file_placement_equals_mapped_placement(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mixed: Any,
    chunk: int | None,
    rows: int | None,
    streamed: bool,
) -> None:
    model, abstract, state = mixed
    if chunk is not None:  # cut every tensor into many chunks, rows not a multiple
        monkeypatch.setattr(_placement, "DIRECT_CHUNK", chunk)
        monkeypatch.setattr(_placement, "LAYOUT_CHUNK", chunk)
        monkeypatch.setattr(_placement, "AHEAD", 3 * chunk)
    if streamed:  # as for an accelerator: a window of variables read ahead, put in batches
        monkeypatch.setattr(_placement, "_stays_on_host", lambda: False)
        monkeypatch.setattr(_placement, "PUT_BATCH", 2)
    if rows is not None:  # layout chunks of 3 rows at most: ragged, whatever their bytes
        monkeypatch.setattr(_placement, "LAYOUT_ROWS", rows)
    rows_read: list[str] = []
    read_rows = _placement.read_rows

    def counted(extent: Any, *args: Any, **kwargs: Any) -> None:
        rows_read.append(str(extent.shape))
        read_rows(extent, *args, **kwargs)

    def counted_chunk(chunks: Any, extent: Any, *args: Any, **kwargs: Any) -> Any:
        rows_read.append(str(extent.shape))
        return read_chunk(chunks, extent, *args, **kwargs)

    read_chunk = _placement.RowChunks.read
    monkeypatch.setattr(_placement, "read_rows", counted)
    monkeypatch.setattr(_placement.RowChunks, "read", counted_chunk)
    for fmt in ("safetensors", "bin", "safetensors-index", "bin-index"):
        directory = tmp_path / fmt
        directory.mkdir()
        path = _write(directory, fmt, state)
        rows_read.clear()
        fast, report = fr.from_torch(model, path, variables=abstract)
        assert report.ok
        nonscalar = [t for t in state.values() if t.dim()]
        assert len(rows_read) >= len(nonscalar) + 2  # every tensor by rows (attention: fused)
        with monkeypatch.context() as m:
            _mapped_path(m)
            mapped, _ = fr.from_torch(model, path, variables=abstract)
        assert _leaves(fast) == _leaves(mapped), fmt
        back = fr.to_torch(model, fast, as_torch=True)
        assert all(_same_bits(back[k], t) for k, t in state.items()), fmt  # torch's bits


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("policy", [None, "checkpoint", jnp.bfloat16, jnp.float16])
def test_casts_and_torch_layouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, policy: Any
) -> None:
    model = Registry()
    state = _torch_state(model, 1)
    state = {k: (v.to(torch.bfloat16) if k == "fc.weight" else v) for k, v in state.items()}
    path = _write(tmp_path, fmt, state)
    monkeypatch.setattr(_placement, "DIRECT_CHUNK", 64)
    monkeypatch.setattr(_placement, "LAYOUT_CHUNK", 100)
    fast, _ = fr.from_torch(model, path, dtype=policy)
    with monkeypatch.context() as m:
        _mapped_path(m)
        mapped, _ = fr.from_torch(model, path, dtype=policy)
    assert _leaves(fast) == _leaves(mapped)
    for key, value in fr.state_dict(model, fast).items():  # torch's own cast of its values
        array = np.asarray(value).reshape(-1)
        dtype = getattr(torch, str(array.dtype))
        got = torch.from_numpy(array.view(np.uint8).copy()).view(dtype)
        expected = state[key].to(dtype)
        assert _same_bits(got.reshape(expected.shape), expected), key


def test_arrays_adopt_the_read_buffers(tmp_path: Path) -> None:
    """On CPU each loaded array is the buffer the file was read into (no copy)."""
    model = Registry()
    path = _write(tmp_path, "safetensors", _torch_state(model, 2))
    seen: list[tuple[int, int]] = []
    original = jax.device_put

    def spy(x: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(x, *args, **kwargs)
        if isinstance(x, np.ndarray) and x.size and jax.default_backend() == "cpu":
            seen.append((x.ctypes.data, out.unsafe_buffer_pointer()))
        return out

    with pytest.MonkeyPatch.context() as m:
        m.setattr(_placement.jax, "device_put", spy)
        fr.from_torch(model, path)
    assert seen and all(a == b for a, b in seen)


@pytest.mark.parametrize("streamed", [False, True], ids=["host", "streamed"])
def test_a_failed_read_raises_and_stops_the_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mixed: Any, streamed: bool
) -> None:
    """A chunk that fails (the file cut short under the reader) fails the whole load with its
    own error, whichever variable it belongs to; no worker is left running."""
    model, abstract, state = mixed
    path = _write(tmp_path, "safetensors", state)
    if streamed:
        monkeypatch.setattr(_placement, "_stays_on_host", lambda: False)
    calls: list[int] = []
    read = _placement.RowChunks.read

    def failing(chunks: Any, extent: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise fr.io.CheckpointError(f"{path}: the file ended (simulated)")
        return read(chunks, extent, *args, **kwargs)

    monkeypatch.setattr(_placement.RowChunks, "read", failing)
    with pytest.raises(fr.io.CheckpointError, match="simulated"):
        fr.from_torch(model, path, variables=abstract)
    assert not [t for t in threading.enumerate() if t.name.startswith("from_torch")]
