"""The conversion rules of flax.linen's own layers (the built-in table; see
`flax_registry.convert._rules` for what each entry means)."""

from __future__ import annotations

import flax.linen as nn
import numpy as np

from ..convert._einsum import einsum_bias_layout, einsum_kernel_layout
from ..convert._layer_layouts import (
    NUM_BATCHES_REASON,
    MultiHeadAttentionRule,
    conv_layout,
    conv_transpose_layout,
    dense_general_bias_layout,
    dense_general_layout,
)
from ..convert._layout import LINEAR
from ..convert._rules import BATCH_STATS, BUILTIN_RULES, Map, Rule, TorchOnly


def _norm_rule() -> Rule:
    return Rule(Map("weight", "scale"), Map("bias", "bias"))


LINEN_RULES: dict[type, Rule] = {
    nn.Dense: Rule(Map("weight", "kernel", layout=LINEAR), Map("bias", "bias")),
    nn.DenseGeneral: Rule(
        Map("weight", "kernel", layout=dense_general_layout),
        Map("bias", "bias", layout=dense_general_bias_layout),
    ),
    nn.Einsum: Rule(
        Map("weight", "kernel", layout=einsum_kernel_layout),
        Map("bias", "bias", layout=einsum_bias_layout),
    ),
    nn.Conv: Rule(Map("weight", "kernel", layout=conv_layout), Map("bias", "bias")),
    nn.ConvTranspose: Rule(
        Map("weight", "kernel", layout=conv_transpose_layout), Map("bias", "bias")
    ),
    nn.BatchNorm: Rule(
        Map("weight", "scale"),
        Map("bias", "bias"),
        Map("running_mean", "mean", collection=BATCH_STATS),
        Map("running_var", "var", collection=BATCH_STATS),
        TorchOnly("num_batches_tracked", "mean", np.zeros((), np.int64), NUM_BATCHES_REASON),
    ),
    nn.LayerNorm: _norm_rule(),
    nn.GroupNorm: _norm_rule(),
    nn.RMSNorm: _norm_rule(),
    nn.Embed: Rule(Map("weight", "embedding")),
    nn.MultiHeadDotProductAttention: MultiHeadAttentionRule(),
}

BUILTIN_RULES.update(LINEN_RULES)
