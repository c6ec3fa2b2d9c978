"""The conversion rules of flax.nnx's own layers (the same torch layouts as linen's: NNX keeps
kernels as (..., in, out) and convolutions as (*k, in, out))."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from ..convert._layer_layouts import (
    NUM_BATCHES_REASON,
    MultiHeadAttentionRule,
    conv_layout,
    conv_transpose_layout,
)
from ..convert._layout import LINEAR, Layout
from ..convert._rules import BATCH_STATS, BUILTIN_RULES, Map, Rule, TorchOnly


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


def _norm_rule() -> Rule:
    return Rule(Map("weight", "scale"), Map("bias", "bias"))


NNX_RULES: dict[type, Rule] = {
    nnx.Linear: Rule(Map("weight", "kernel", layout=LINEAR), Map("bias", "bias")),
    nnx.LinearGeneral: Rule(
        Map("weight", "kernel", layout=linear_general_layout),
        Map("bias", "bias", layout=linear_general_bias_layout),
    ),
    nnx.Conv: Rule(Map("weight", "kernel", layout=conv_layout), Map("bias", "bias")),
    nnx.ConvTranspose: Rule(
        Map("weight", "kernel", layout=conv_transpose_layout), Map("bias", "bias")
    ),
    nnx.BatchNorm: Rule(
        Map("weight", "scale"),
        Map("bias", "bias"),
        Map("running_mean", "mean", collection=BATCH_STATS),
        Map("running_var", "var", collection=BATCH_STATS),
        TorchOnly("num_batches_tracked", "mean", np.zeros((), np.int64), NUM_BATCHES_REASON),
    ),
    nnx.LayerNorm: _norm_rule(),
    nnx.GroupNorm: _norm_rule(),
    nnx.RMSNorm: _norm_rule(),
    nnx.Embed: Rule(Map("weight", "embedding")),
    nnx.MultiHeadAttention: MultiHeadAttentionRule(),
}

BUILTIN_RULES.update(NNX_RULES)
