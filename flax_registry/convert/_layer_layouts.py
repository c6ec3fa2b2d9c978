"""Layouts and rules of the standard layers: functions of the layer's attributes and shapes.

Front-end neutral: they read attributes (`features`, `transpose_kernel`, `batch_dims`) and
shapes, never a Flax API; each adapter's built-in table (`flax_registry._linen.rules`) pairs
them with its own layer classes. See `flax_registry.convert._rules` for the table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._registry import PARAMS
from ._layout import IDENTITY, LINEAR, Layout
from ._rules import Extra, Fused, LayerVariables, Map, Resolved, Rule, TorchOnly

# --- layouts that depend on the layer ----------------------------------------------------------


def conv_layout(module: Any, shape: tuple[int, ...]) -> Layout:
    """ConvNd: torch (out, in/groups, *k) <-> flax (*k, in/groups, out)."""
    n = len(shape) - 2
    return Layout(perm=(*range(2, n + 2), 1, 0))


def conv_transpose_layout(module: Any, shape: tuple[int, ...]) -> Layout:
    """ConvTransposeNd: torch (in, out, *k) <-> flax (*k, in, out) flipped spatially, or, with
    `transpose_kernel=True`, flax (*k, out, in) unflipped (flax then flips it itself)."""
    n = len(shape) - 2
    if getattr(module, "transpose_kernel", False):
        return Layout(perm=(*range(2, n + 2), 1, 0))
    return Layout(perm=(*range(2, n + 2), 0, 1), flip=tuple(range(n)))


def _features(module: Any) -> int:
    features = module.features
    return len(features) if isinstance(features, Sequence) else 1


def dense_general_layout(module: Any, shape: tuple[int, ...]) -> Layout:
    """DenseGeneral kernel (*in, *out) <-> Linear weight (prod(out), prod(in))."""
    if getattr(module, "batch_dims", ()):
        raise ValueError(
            f"{type(module).__name__} with batch_dims={module.batch_dims} has no torch Linear "
            "counterpart; register a rule for it with flax_registry.convert.register_rule."
        )
    n_out = _features(module)
    n_in = len(shape) - n_out
    return Layout(perm=(*range(n_out, n_out + n_in), *range(n_out)), merge=(n_out, n_in))


def dense_general_bias_layout(module: Any, shape: tuple[int, ...]) -> Layout:
    """DenseGeneral bias (*out) <-> Linear bias (prod(out),)."""
    return Layout(merge=(len(shape),))


QKV_WEIGHT = Layout(perm=(2, 0, 1), merge=(2, 1))  # (in, heads, head_dim) <-> (heads*head_dim, in)
QKV_BIAS = Layout(merge=(2,))  # (heads, head_dim) <-> (heads*head_dim,)
OUT_WEIGHT = Layout(
    perm=(1, 2, 0), merge=(1, 2)
)  # (heads, head_dim, out) <-> (out, heads*head_dim)


class MultiHeadAttentionRule(Rule):
    """`nn.MultiHeadDotProductAttention` <-> `torch.nn.MultiheadAttention` (default), or, with
    `fused=False`, four separate Linear layers named by `names` (e.g. Hugging Face's
    `{"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}`).

    Fused layout: `in_proj_weight` (3E, E) holds the query, key and value weights as rows
    [0:E], [E:2E], [2E:3E] (each (heads*head_dim, in), heads outermost), `in_proj_bias` (3E,)
    likewise; when the key or value input size differs from the query's, torch keeps
    `q_proj_weight`, `k_proj_weight`, `v_proj_weight` instead (bias still fused).
    `out_proj.weight` is (out, heads*head_dim). Extra flax children (`query_ln`, `key_ln` with
    `normalize_qk=True`) keep their own rules.
    """

    def __init__(self, fused: bool = True, names: Mapping[str, str] | None = None) -> None:
        self.fused = fused
        self.names = dict(names or {"query": "query", "key": "key", "value": "value", "out": "out"})
        super().__init__()

    def __repr__(self) -> str:
        return f"MultiHeadAttentionRule(fused={self.fused}, names={self.names})"

    def expand(self, module: Any, variables: LayerVariables) -> tuple[list[Resolved], list[Extra]]:
        qkv = ("query", "key", "value")
        if not self.fused:
            entries: list[Map | Fused | TorchOnly] = []
            for name in (*qkv, "out"):
                torch_name = self.names.get(name, name)
                w, b = (OUT_WEIGHT, IDENTITY) if name == "out" else (QKV_WEIGHT, QKV_BIAS)
                entries.append(Map(f"{torch_name}.weight", f"{name}/kernel", layout=w))
                entries.append(Map(f"{torch_name}.bias", f"{name}/bias", layout=b))
            return Rule(*entries).expand(module, variables)
        in_sizes = {variables[(PARAMS, (n, "kernel"))].shape[0] for n in qkv}
        fused: list[Map | Fused | TorchOnly] = []
        if len(in_sizes) == 1:
            parts = tuple(Map("", f"{n}/kernel", layout=QKV_WEIGHT) for n in qkv)
            fused.append(Fused("in_proj_weight", parts))
        else:
            fused.extend(Map(f"{n[0]}_proj_weight", f"{n}/kernel", layout=QKV_WEIGHT) for n in qkv)
        fused.append(
            Fused("in_proj_bias", tuple(Map("", f"{n}/bias", layout=QKV_BIAS) for n in qkv))
        )
        fused.append(Map("out_proj.weight", "out/kernel", layout=OUT_WEIGHT))
        fused.append(Map("out_proj.bias", "out/bias"))
        return Rule(*fused).expand(module, variables)


NUM_BATCHES_REASON = (
    "flax BatchNorm keeps no batch counter (torch uses it only with momentum=None); "
    "its value is kept in LoadReport.extras and written back by to_torch(..., report=)"
)


# --- the rules both front-ends' standard layers share ------------------------------------------


def linear_rule(kernel: Any = None, bias: Any = IDENTITY) -> Rule:
    """A layer with torch's `weight` as flax's `kernel` (a Dense, Conv, Einsum ...), laid out
    by `kernel` (torch Linear's (out, in) <-> (in, out) by default) and an optional bias."""
    return Rule(
        Map("weight", "kernel", layout=LINEAR if kernel is None else kernel),
        Map("bias", "bias", layout=bias),
    )


def norm_rule() -> Rule:
    """LayerNorm / GroupNorm / RMSNorm: torch's `weight` is flax's `scale`."""
    return Rule(Map("weight", "scale"), Map("bias", "bias"))


def batch_norm_rule(stats: str) -> Rule:
    """BatchNorm: the affine parameters, the running statistics in collection `stats`, and
    torch's `num_batches_tracked`, which flax does not keep (see `NUM_BATCHES_REASON`)."""
    return Rule(
        Map("weight", "scale"),
        Map("bias", "bias"),
        Map("running_mean", "mean", collection=stats),
        Map("running_var", "var", collection=stats),
        TorchOnly("num_batches_tracked", "mean", np.zeros((), np.int64), NUM_BATCHES_REASON),
    )


EMBED_RULE = Rule(Map("weight", "embedding"))
