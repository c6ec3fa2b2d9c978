"""The conversion rules of flax.linen's own layers (the built-in table; see
`flax_registry.convert._rules` for what each entry means)."""

from __future__ import annotations

import flax.linen as nn

from ..convert._einsum import einsum_bias_layout, einsum_kernel_layout
from ..convert._layer_layouts import (
    EMBED_RULE,
    MultiHeadAttentionRule,
    batch_norm_rule,
    conv_layout,
    conv_transpose_layout,
    dense_general_bias_layout,
    dense_general_layout,
    linear_rule,
    norm_rule,
)
from ..convert._rules import BATCH_STATS, BUILTIN_RULES, Rule

LINEN_RULES: dict[type, Rule] = {
    nn.Dense: linear_rule(),
    nn.DenseGeneral: linear_rule(dense_general_layout, dense_general_bias_layout),
    nn.Einsum: linear_rule(einsum_kernel_layout, einsum_bias_layout),
    nn.Conv: linear_rule(conv_layout),
    nn.ConvTranspose: linear_rule(conv_transpose_layout),
    nn.BatchNorm: batch_norm_rule(BATCH_STATS),
    nn.LayerNorm: norm_rule(),
    nn.GroupNorm: norm_rule(),
    nn.RMSNorm: norm_rule(),
    nn.Embed: EMBED_RULE,
    nn.MultiHeadDotProductAttention: MultiHeadAttentionRule(),
}

BUILTIN_RULES.update(LINEN_RULES)
