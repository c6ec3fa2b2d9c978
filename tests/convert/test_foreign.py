"""Conversion into Flax models written the way other codebases write them, against their
PyTorch twins: explicitly named list children, raw `self.param` variables, a module shared by
two parents, a tied `Embed.attend` head, an extra collection level, keyword-only inputs and
a bare params tree. Each model is plain linen (no flax_registry base class), as users'
models are; each twin is plain torch."""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as T

from flax_registry import from_torch, to_torch
from flax_registry.convert import IDENTITY, LINEAR, Inputs, Map, Rule
from tests.convert._helpers import assert_bit_identical, randomize
from tests.parity import TOL

D, HIDDEN, VOCAB, LAYERS = 8, 12, 11, 3


def _ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (2, 5))


def _x(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _strict_into(twin: T.Module, state_dict: dict[str, Any]) -> T.Module:
    twin.load_state_dict(state_dict, strict=True)
    return twin.eval()


# --- 1. explicitly named list children (`Layer(name=str(i))` in a collection module) ------------


class FlaxBlock(nn.Module):
    def setup(self) -> None:
        self.dense = nn.Dense(HIDDEN)
        self.out = nn.Dense(D)
        self.norm = nn.LayerNorm(epsilon=1e-5)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(x + self.out(jax.nn.relu(self.dense(x))))


class FlaxBlockCollection(nn.Module):
    def setup(self) -> None:
        self.layers = [FlaxBlock(name=str(i)) for i in range(LAYERS)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class FlaxEncoder(nn.Module):
    def setup(self) -> None:
        self.layer = FlaxBlockCollection()

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layer(x)


class TorchBlock(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense, self.out, self.norm = T.Linear(D, HIDDEN), T.Linear(HIDDEN, D), T.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.out(torch.relu(self.dense(x))))


class TorchEncoder(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = T.ModuleList([TorchBlock() for _ in range(LAYERS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


def test_explicit_names_decide_the_torch_names() -> None:
    twin = randomize(TorchEncoder()).eval()
    x = _x((2, D))
    variables, report = from_torch(FlaxEncoder(), twin.state_dict(), example_inputs=(x,))
    assert report.ok
    assert "layer" in variables["params"] and "0" in variables["params"]["layer"]
    with torch.no_grad():
        expected = twin(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(FlaxEncoder().apply(variables, x)), expected, **TOL)
    back = to_torch(FlaxEncoder(), variables, example_inputs=(x,))
    assert list(back) == list(twin.state_dict())
    assert_bit_identical(back, twin.state_dict())


# --- 2. raw self.param variables in custom modules ---------------------------------------------


class RMSNorm(nn.Module):
    def setup(self) -> None:
        self.weight = self.param("weight", nn.initializers.ones, (D,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * self.weight


class Embeddings(nn.Module):
    """ViT-style: a class token and position embeddings as raw params, a child projection."""

    def setup(self) -> None:
        self.cls_token = self.param("cls_token", nn.initializers.normal(), (1, 1, D))
        self.projection = nn.Dense(D)
        self.position_embeddings = self.param(
            "position_embeddings", nn.initializers.normal(), (1, 4, D)
        )

    def __call__(self, patches: jax.Array) -> jax.Array:
        x = self.projection(patches)
        cls = jnp.broadcast_to(self.cls_token, (x.shape[0], 1, D))
        return jnp.concatenate([cls, x], axis=1) + self.position_embeddings


class FlaxViTLike(nn.Module):
    def setup(self) -> None:
        self.embeddings = Embeddings()
        self.norm = RMSNorm()

    def __call__(self, patches: jax.Array) -> jax.Array:
        return self.norm(self.embeddings(patches))


class TorchRMSNorm(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = T.Parameter(torch.ones(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * self.weight


class TorchEmbeddings(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = T.Parameter(torch.zeros(1, 1, D))
        self.projection = T.Linear(6, D)
        self.position_embeddings = T.Parameter(torch.zeros(1, 4, D))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.projection(patches)
        cls = self.cls_token.expand(x.shape[0], 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embeddings


class TorchViTLike(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings, self.norm = TorchEmbeddings(), TorchRMSNorm()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embeddings(patches))


def test_raw_params_of_custom_modules_load_unchanged() -> None:
    twin = randomize(TorchViTLike()).eval()
    patches = _x((2, 3, 6))
    variables, report = from_torch(FlaxViTLike(), twin.state_dict(), example_inputs=(patches,))
    assert report.ok
    with torch.no_grad():
        expected = twin(torch.tensor(patches)).numpy()
    np.testing.assert_allclose(np.asarray(FlaxViTLike().apply(variables, patches)), expected, **TOL)
    back = to_torch(FlaxViTLike(), variables)  # the layer types were recorded by from_torch
    assert_bit_identical(
        {k: back[k] for k in twin.state_dict()}, twin.state_dict()
    )  # torch's order puts a module's own parameters before its children
    _strict_into(TorchViTLike(), {k: torch.from_numpy(v) for k, v in back.items()})


class SquareKernel(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.param("kernel", nn.initializers.lecun_normal(), (D, D))


class SquareMatrix(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.param("mix", nn.initializers.lecun_normal(), (D, D))


class TorchSquare(T.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.register_parameter(name, T.Parameter(torch.randn(D, D)))


def test_square_kernel_without_rule_is_refused_and_nothing_loads() -> None:
    x = _x((2, D))
    state = TorchSquare("kernel").state_dict()
    with pytest.raises(ValueError) as info:
        from_torch(SquareKernel(), state, example_inputs=(x,))
    message = str(info.value)
    assert message.startswith(
        "no conversion rule for SquareKernel at flax scope '<root>' (its variables "
        "['params/kernel'])."
    )
    assert "register_rule(SquareKernel" in message
    assert "Its variable 'kernel' is named as flax names weights" in message
    # Stated explicitly, the same file loads: a rule says it is stored as torch stores it.
    rule = {SquareKernel: Rule(Map("kernel", "kernel", layout=IDENTITY))}
    variables, report = from_torch(SquareKernel(), state, example_inputs=(x,), rules=rule)
    assert report.ok
    np.testing.assert_array_equal(variables["params"]["kernel"], state["kernel"].numpy())


def test_square_variable_of_any_name_is_ambiguous() -> None:
    x = _x((2, D))
    with pytest.raises(ValueError) as info:
        from_torch(SquareMatrix(), TorchSquare("mix").state_dict(), example_inputs=(x,))
    assert str(info.value) == (
        "cannot convert flax variable 'params/mix' of SquareMatrix (a layer with no "
        "conversion rule): its shape (8, 8) has two axes of the same length, so it may be "
        "stored in torch's order or transposed, and loading it unchanged could put every value "
        "in the wrong place. State its layout with a rule: "
        "flax_registry.convert.register_rule(SquareMatrix, Rule(Map('<torch name>', 'mix', "
        "layout=LINEAR))) for a (in, out) kernel that torch keeps as (out, in), or "
        "Rule(Map('mix', 'mix')) if it is stored exactly as in torch (or pass "
        "rules={SquareMatrix: ...} for one call)."
    )
    # And export refuses too: a wrong layout is as wrong on the way out.
    abstract = jax.eval_shape(lambda: SquareMatrix().init(jax.random.key(0), x))
    with pytest.raises(ValueError, match=r"'params/mix' of SquareMatrix"):
        to_torch(SquareMatrix(), abstract, example_inputs=(x,))


class InOut(nn.Module):
    """A custom layer that keeps a `weight` (in, out): a layout torch's twin does not share."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.param("weight", nn.initializers.lecun_normal(), (D, HIDDEN))


def test_transposed_raw_variable_is_a_size_mismatch_naming_the_fix() -> None:
    x = _x((2, D))
    state = T.Linear(D, HIDDEN, bias=False).state_dict()  # weight (HIDDEN, D)
    with pytest.raises(RuntimeError) as info:
        from_torch(InOut(), state, example_inputs=(x,))
    assert str(info.value) == (
        "Error(s) in loading state_dict for InOut:\n\tsize mismatch for weight: copying a "
        "param with shape (12, 8) from checkpoint, the shape in current model is (8, 12).\n\t"
        "weight belongs to InOut, a layer without a conversion rule, whose variables are loaded "
        "under their own names, unchanged: if the layer stores it in another layout (e.g. a "
        "(in, out) kernel where torch has (out, in)), register a rule for InOut with "
        "flax_registry.convert.register_rule (layout=LINEAR for a transpose)."
    )
    rule = {InOut: Rule(Map("weight", "weight", layout=LINEAR))}
    variables, _ = from_torch(InOut(), state, example_inputs=(x,), rules=rule)
    with torch.no_grad():
        expected = torch.tensor(x) @ state["weight"].T
    np.testing.assert_allclose(np.asarray(InOut().apply(variables, x)), expected.numpy(), **TOL)


# --- 3a. one module shared by two parents ------------------------------------------------------


class FlaxStack(nn.Module):
    embed_tokens: nn.Module

    def setup(self) -> None:
        self.proj = nn.Dense(D)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.proj(self.embed_tokens(ids))


class FlaxEncoderDecoder(nn.Module):
    def setup(self) -> None:
        self.shared = nn.Embed(VOCAB, D)
        self.encoder = FlaxStack(self.shared)
        self.decoder = FlaxStack(self.shared)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.encoder(ids) * self.decoder(ids)


class TorchStack(T.Module):
    def __init__(self, embed_tokens: T.Embedding) -> None:
        super().__init__()
        self.embed_tokens, self.proj = embed_tokens, T.Linear(D, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed_tokens(ids))


class TorchEncoderDecoder(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = T.Embedding(VOCAB, D)
        self.encoder, self.decoder = TorchStack(self.shared), TorchStack(self.shared)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids) * self.decoder(ids)


def test_module_shared_by_two_parents() -> None:
    twin = randomize(TorchEncoderDecoder()).eval()
    ids = _ids()
    model = FlaxEncoderDecoder()
    variables, report = from_torch(model, twin.state_dict(), example_inputs=(ids,))
    assert report.ok
    assert sorted(report.tied_aliases) == [
        ("decoder.embed_tokens.weight", "shared.weight"),
        ("encoder.embed_tokens.weight", "shared.weight"),
    ]
    assert set(variables["params"]) == {"decoder", "encoder", "shared"}  # one embedding
    with torch.no_grad():
        expected = twin(torch.tensor(ids)).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, ids)), expected, **TOL)
    back = to_torch(model, variables, as_torch=True)
    assert list(back) == list(twin.state_dict())
    assert back["encoder.embed_tokens.weight"] is back["shared.weight"]  # one tensor, as torch
    fresh = _strict_into(TorchEncoderDecoder(), back)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(torch.tensor(ids)).numpy(), expected, **TOL)


def test_shared_module_aliases_must_agree() -> None:
    state = {k: v.clone() for k, v in randomize(TorchEncoderDecoder()).state_dict().items()}
    state["decoder.embed_tokens.weight"] += 1.0  # no longer the same tensor
    with pytest.raises(ValueError, match=r"tied keys .*are one variable in FlaxEncoderDecoder"):
        from_torch(FlaxEncoderDecoder(), state, example_inputs=(_ids(),))


# --- 3b. an output head tied through Embed.attend ------------------------------------------------


class FlaxTiedLM(nn.Module):
    def setup(self) -> None:
        self.embed = nn.Embed(VOCAB, D)
        self.block = nn.Dense(D)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.embed.attend(jnp.tanh(self.block(self.embed(ids))))


class TorchTiedLM(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.block = T.Embedding(VOCAB, D), T.Linear(D, D)
        self.lm_head = T.Linear(D, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.block(self.embed(ids))))


@pytest.mark.parametrize("where", ["state_dict", "torch.save"])
def test_attend_head_tied_in_the_checkpoint(where: str, tmp_path: Any) -> None:
    twin = randomize(TorchTiedLM()).eval()
    ids = _ids()
    source: Any = twin.state_dict()
    if where == "torch.save":
        source = tmp_path / "model.pt"
        torch.save(twin.state_dict(), source)
    model = FlaxTiedLM()
    variables, report = from_torch(model, source, example_inputs=(ids,))
    assert report.ok and report.checkpoint_aliases == {"lm_head.weight": "embed.weight"}
    assert ("lm_head.weight", "embed.weight") in report.tied_aliases
    with torch.no_grad():
        expected = twin(torch.tensor(ids)).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, ids)), expected, **TOL)
    back = to_torch(model, variables, report=report, as_torch=True)
    assert list(back) == list(twin.state_dict())
    assert back["lm_head.weight"] is back["embed.weight"]
    _strict_into(TorchTiedLM(), back)


def test_untied_copy_of_a_head_stays_unexpected() -> None:
    state = {k: v.clone() for k, v in randomize(TorchTiedLM()).state_dict().items()}
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "lm_head.weight"'):
        from_torch(FlaxTiedLM(), state, example_inputs=(_ids(),))
    # Declared, equal values load: tied= names the alias.
    variables, report = from_torch(
        FlaxTiedLM(), state, example_inputs=(_ids(),), tied={"lm_head.weight": "embed.weight"}
    )
    assert report.ok


# --- 3c. an extra collection level the twin does not have -------------------------------------


class FlaxStage(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(nn.Dense(D, name="conv")(x))


class FlaxStageCollection(nn.Module):
    def setup(self) -> None:
        self.layers = [FlaxStage() for _ in range(2)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class FlaxStagedEncoder(nn.Module):
    def setup(self) -> None:
        self.stages = FlaxStageCollection()

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.stages(x)


class FlaxStaged(nn.Module):
    def setup(self) -> None:
        self.encoder = FlaxStagedEncoder()

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.encoder(x)


class TorchStage(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = T.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class TorchStaged(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = T.Module()
        self.encoder.stages = T.Sequential(TorchStage(), TorchStage())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.stages(x)


def test_extra_collection_level_says_which_rename_fixes_it() -> None:
    twin = randomize(TorchStaged()).eval()
    x = _x((2, D))
    with pytest.raises(RuntimeError) as info:
        from_torch(FlaxStaged(), twin.state_dict(), example_inputs=(x,))
    lines = str(info.value).split("\n\t")
    assert lines[0] == "Error(s) in loading state_dict for FlaxStaged:"
    assert lines[1].startswith(
        'Missing key(s) in state_dict: "encoder.stages.layers.0.conv.weight"'
    )
    assert lines[2].startswith('Unexpected key(s) in state_dict: "encoder.stages.0.conv.weight"')
    assert lines[3:] == [
        'renames={r"^encoder\\.stages\\.": r"encoder.stages.layers."} would '
        "match 4 of the 4 missing keys.",
        "Did you mean (closest checkpoint key for each missing key):",
        '    "encoder.stages.layers.0.conv.weight" <- "encoder.stages.0.conv.weight"',
        '    "encoder.stages.layers.0.conv.bias" <- "encoder.stages.0.conv.bias"',
        '    "encoder.stages.layers.1.conv.weight" <- "encoder.stages.1.conv.weight"',
        '    "encoder.stages.layers.1.conv.bias" <- "encoder.stages.1.conv.bias"',
    ]
    # The suggested pattern, as printed, is the fix.
    renames = {r"^encoder\.stages\.": r"encoder.stages.layers."}
    model = FlaxStaged()
    variables, report = from_torch(model, twin.state_dict(), example_inputs=(x,), renames=renames)
    assert report.ok and len(report.renamed) == 4
    with torch.no_grad():
        expected = twin(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)), expected, **TOL)
    back = to_torch(model, variables, report=report)
    assert_bit_identical(back, twin.state_dict())


def test_base_model_prefix_is_suggested() -> None:
    twin = randomize(TorchEncoder()).eval()
    state = {f"bert.{k}": v for k, v in twin.state_dict().items()}
    with pytest.raises(
        RuntimeError, match=re.escape('renames={r"^bert\\.": r""} would match 18 of the 18')
    ):
        from_torch(FlaxEncoder(), state, example_inputs=(_x((2, D)),))


# --- 4. keyword inputs, and to_torch without them --------------------------------------------


class FlaxKeywordModel(nn.Module):
    @nn.compact
    def __call__(
        self,
        *,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        h = nn.Embed(VOCAB, D, name="embed")(input_ids)
        h = nn.Dense(D, name="proj")(h)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return nn.Dropout(0.5, deterministic=deterministic)(h)


class TorchKeywordModel(T.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.proj = T.Embedding(VOCAB, D), T.Linear(D, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(input_ids)) * attention_mask[..., None]


@pytest.mark.parametrize("style", ["mapping", "Inputs"])
def test_keyword_only_inputs(style: str) -> None:
    twin = randomize(TorchKeywordModel()).eval()
    ids, mask = _ids(), np.ones((2, 5), np.float32)
    inputs: Any = {"input_ids": ids, "attention_mask": mask}
    if style == "Inputs":
        inputs = Inputs(input_ids=ids, attention_mask=mask, deterministic=True)
    model = FlaxKeywordModel()
    variables, report = from_torch(model, twin.state_dict(), example_inputs=inputs)
    assert report.ok
    with torch.no_grad():
        expected = twin(torch.tensor(ids), torch.tensor(mask)).numpy()
    out = model.apply(variables, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(out), expected, **TOL)
    # to_torch on the same module object needs no inputs: from_torch recorded the layers.
    back = to_torch(model, variables)
    assert_bit_identical(back, twin.state_dict())
    # A new instance has recorded nothing: it says what to pass.
    with pytest.raises(ValueError, match=r"created inside a compact __call__.*example_inputs"):
        to_torch(FlaxKeywordModel(), variables)


# --- 5. a bare params tree ---------------------------------------------------------------------


def test_bare_params_tree_says_what_to_pass() -> None:
    twin = randomize(TorchEncoder()).eval()
    x = _x((2, D))
    variables, _ = from_torch(FlaxEncoder(), twin.state_dict(), example_inputs=(x,))
    bare = variables["params"]
    expected = (
        "variables= for FlaxEncoder has no collection level: its top-level keys ['layer'] are "
        "submodules of FlaxEncoder, where flax expects collections such as 'params'. A Hugging Face "
        "model's `model.params` (or `params_shape_tree`) and flax's `variables['params']` are "
        "the 'params' collection alone: pass variables={'params': tree} (with every other "
        "collection beside it, e.g. {'params': params, 'batch_stats': batch_stats})."
    )
    for call in (
        lambda: from_torch(FlaxEncoder(), twin.state_dict(), variables=bare),
        lambda: to_torch(FlaxEncoder(), bare),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == expected
    compact = FlaxKeywordModel()
    compact_bare = jax.eval_shape(lambda: compact.init(jax.random.key(0), input_ids=_ids()))
    with pytest.raises(
        ValueError,
        match=r"top-level keys \['embed', 'proj'\] are not the collections FlaxKeywordModel.init creates \(\['params'\]\)",
    ):
        from_torch(
            compact, {}, variables=compact_bare["params"], example_inputs={"input_ids": _ids()}
        )
    # Wrapped as the message says, it loads.
    loaded, report = from_torch(FlaxEncoder(), twin.state_dict(), variables={"params": bare})
    assert report.ok
    assert_bit_identical(to_torch(FlaxEncoder(), loaded), twin.state_dict())


def test_plain_array_for_variables_is_refused() -> None:
    with pytest.raises(TypeError, match=r"variables= must be a mapping of flax collections"):
        from_torch(FlaxEncoder(), {}, variables=np.zeros(3))  # type: ignore[arg-type]


class FlaxPReLUNet(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.PReLU(name="act")(nn.Dense(D, name="fc")(x))


def test_flax_layer_without_rule_is_refused() -> None:
    # flax's own layers keep flax's conventions; without a rule nothing is assumed of them
    state = {
        "fc.weight": torch.zeros(D, D),
        "fc.bias": torch.zeros(D),
        "act.weight": torch.zeros(1),
    }
    with pytest.raises(ValueError, match=r"^no conversion rule for PReLU at flax scope 'act'"):
        from_torch(FlaxPReLUNet(), state, example_inputs=(_x((2, D)),))
