"""The conversion rules of flax.nnx's own layers (the same torch layouts as linen's: NNX keeps
kernels as (..., in, out) and convolutions as (*k, in, out))."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

from ..convert._layer_layouts import (
    EMBED_RULE,
    MultiHeadAttentionRule,
    batch_norm_rule,
    conv_layout,
    conv_transpose_layout,
    linear_rule,
    norm_rule,
)
from ..convert._layout import Layout
from ..convert._rules import BATCH_STATS, BUILTIN_RULES, Rule


def linear_general_layout(module: Any, shape: tuple[int, ...]) -> Layout:
    """`nnx.LinearGeneral` kernel (*in, *out) <-> Linear weight (prod(out), prod(in))."""
    if getattr(module, "batch_axis", None):
        raise ValueError(
            f"{type(module).__name__} with batch_axis={module.batch_axis} has no torch Linear "
            "counterpart; register a rule for it with flax_registry.convert.register_rule."
        )
    out = module.out_features
    n_out = len(out) if isinstance(out, Sequence) else 1
    n_in = len(shape) - n_out
    return Layout(perm=(*range(n_out, n_out + n_in), *range(n_out)), merge=(n_out, n_in))


def linear_general_bias_layout(module: Any, shape: tuple[int, ...]) -> Layout:
    return Layout(merge=(len(shape),))


NNX_RULES: dict[type, Rule] = {
    nnx.Linear: linear_rule(),
    nnx.LinearGeneral: linear_rule(linear_general_layout, linear_general_bias_layout),
    nnx.Conv: linear_rule(conv_layout),
    nnx.ConvTranspose: linear_rule(conv_transpose_layout),
    nnx.BatchNorm: batch_norm_rule(BATCH_STATS),
    nnx.LayerNorm: norm_rule(),
    nnx.GroupNorm: norm_rule(),
    nnx.RMSNorm: norm_rule(),
    nnx.Embed: EMBED_RULE,
    nnx.MultiHeadAttention: MultiHeadAttentionRule(),
}

BUILTIN_RULES.update(NNX_RULES)
