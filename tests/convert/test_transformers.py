"""Hugging Face transformers 4.57's Flax ports (independently written linen models) load their
PyTorch twins' weights through `from_torch` with no per-model code, and `to_torch` gives the
twin back: from a state_dict, a single safetensors file and a sharded directory, with
outputs equal to the twin's. Tiny random configs; nothing is downloaded."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flax_registry import from_torch, to_torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TOL = {"rtol": 1e-5, "atol": 1e-5}


@dataclasses.dataclass
class Case:
    config: Callable[[], Any]
    flax: str
    torch: str
    inputs: Callable[[np.random.Generator], dict[str, np.ndarray]]


def _text(rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = rng.integers(0, 99, (2, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _image(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"pixel_values": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}


CASES = {
    "bert": Case(
        lambda: transformers.BertConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
        ),
        "FlaxBertModel",
        "BertModel",
        _text,
    ),
    "vit": Case(
        lambda: transformers.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
        ),
        "FlaxViTModel",
        "ViTModel",
        _image,
    ),
    "llama": Case(
        lambda: transformers.LlamaConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
        ),
        "FlaxLlamaModel",
        "LlamaModel",
        lambda rng: {"input_ids": rng.integers(0, 99, (2, 7))},
    ),
}


def _twins(case: Case) -> tuple[Any, Any]:
    torch.manual_seed(0)
    config = case.config()
    pt = getattr(transformers, case.torch)(config).eval()
    with torch.no_grad():  # random biases and norms too, so a dropped tensor would show
        for p in pt.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    fx = getattr(transformers, case.flax)(config, _do_init=False)
    return pt, fx


def _outputs(pt: Any, fx: Any, params: Any, inputs: dict[str, np.ndarray]) -> tuple[Any, Any]:
    with torch.no_grad():
        ref = pt(**{k: torch.tensor(v) for k, v in inputs.items()}).last_hidden_state.numpy()
    out = fx(**inputs, params=params).last_hidden_state
    return np.asarray(out), ref


def _source(kind: str, pt: Any, tmp_path: Path) -> Any:
    if kind == "state_dict":
        return pt.state_dict()
    directory = tmp_path / kind
    shard = "20KB" if kind == "sharded" else "10GB"
    pt.save_pretrained(directory, safe_serialization=True, max_shard_size=shard)
    files = sorted(p.name for p in directory.iterdir())
    if kind == "sharded":
        assert "model.safetensors.index.json" in files and len(files) > 3, files
    else:
        assert "model.safetensors" in files, files
    return directory


@pytest.mark.parametrize("kind", ["state_dict", "safetensors", "sharded"])
@pytest.mark.parametrize("name", list(CASES))
def test_hugging_face_flax_port_both_directions(name: str, kind: str, tmp_path: Path) -> None:
    case = CASES[name]
    pt, fx = _twins(case)
    inputs = case.inputs(np.random.default_rng(0))
    variables, report = from_torch(
        fx.module, _source(kind, pt, tmp_path), variables={"params": fx.params_shape_tree}
    )
    assert report.ok and not report.casts, report
    out, ref = _outputs(pt, fx, variables["params"], inputs)
    np.testing.assert_allclose(out, ref, **TOL)
    # Back into a fresh PyTorch twin, strictly, and it computes the same.
    state = to_torch(fx.module, variables, as_torch=True)
    fresh = getattr(transformers, case.torch)(case.config()).eval()
    fresh.load_state_dict(state, strict=True)
    for key, value in pt.state_dict().items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():
        again = fresh(**{k: torch.tensor(v) for k, v in inputs.items()}).last_hidden_state
    np.testing.assert_allclose(again.numpy(), ref, **TOL)


def test_example_inputs_as_keywords_instead_of_variables() -> None:
    """Without `variables=`, keyword example inputs give the shapes (under eval_shape) and
    the layer types; `to_torch` then needs neither again for the same module object."""
    pt, fx = _twins(CASES["bert"])
    inputs = _text(np.random.default_rng(1))
    variables, report = from_torch(fx.module, pt.state_dict(), example_inputs=inputs)
    assert report.ok
    out, ref = _outputs(pt, fx, variables["params"], inputs)
    np.testing.assert_allclose(out, ref, **TOL)
    state = to_torch(fx.module, variables)
    assert list(state) == list(pt.state_dict())


def test_base_model_prefix_of_a_task_checkpoint_is_suggested() -> None:
    """A task model's checkpoint (`bert.` prefix) into the base module: the error names the
    rename, and the rename loads it."""
    pt, fx = _twins(CASES["bert"])
    task = {f"bert.{k}": v for k, v in pt.state_dict().items()}
    target = {"params": fx.params_shape_tree}
    with pytest.raises(RuntimeError, match=r'renames=\{r"\^bert\\\.": r""\} would match'):
        from_torch(fx.module, task, variables=target)
    variables, report = from_torch(fx.module, task, variables=target, renames={r"^bert\.": ""})
    assert report.ok
