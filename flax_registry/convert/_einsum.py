"""Layouts derived from an einsum equation: a kernel used as `jnp.einsum(eq, x, kernel)`.

JAX code often keeps a projection's weight in the shape its einsum wants: an attention query
kernel `(e, n, h)` for `"BTE,ENH->BTNH"`, an output kernel `(n, h, e)` for `"BTNH,NHE->BTE"`.
The PyTorch twin keeps a `Linear` weight `(out_features, in_features)`, where the features are
the einsum's output and contracted axes flattened: the equation alone says which is which.

- out axes: kernel axes in the output (not in the input): `N, H` above, flattened in the
  order the output names them (torch's `q_proj(x).view(b, t, n, h)`: heads outermost);
- in axes: kernel axes in the input (not in the output), flattened in the order the input
  names them (torch's `o_proj(x.reshape(b, t, n * h))`).

Batch axes (kernel axes in both the input and the output, a per-head weight) and axes only
the kernel has are not a Linear: the layout refuses them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ._layout import Layout
from ._rules import RuleError

Role = Literal["weight", "weight_in_out", "bias"]

_ROLES = ("weight", "weight_in_out", "bias")


@dataclasses.dataclass(frozen=True, repr=False)
class EinsumLayout(Layout):
    """A `Layout` that remembers the einsum equation it was derived from (for messages)."""

    equation: str = ""
    role: str = "weight"

    def __repr__(self) -> str:
        role = "" if self.role == "weight" else f", role={self.role!r}"
        return f"einsum_layout({self.equation!r}{role})"


def _operands(equation: str, kernel: int) -> tuple[str, str, str]:
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        raise RuleError(
            f"einsum_layout({equation!r}): the equation must be explicit with two operands, "
            "'<input>,<kernel>-><output>' (e.g. 'BTE,ENH->BTNH')."
        )
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    if kernel not in (0, 1):
        raise RuleError(f"einsum_layout({equation!r}): kernel= is 0 or 1, got {kernel!r}")
    spec, inp = ops[kernel], ops[1 - kernel]
    if "..." in spec:
        raise RuleError(
            f"einsum_layout({equation!r}): the kernel operand {spec!r} has an ellipsis; name "
            "each kernel axis."
        )
    inp, out = inp.replace("...", ""), out.replace("...", "")
    for name, s in (("kernel", spec), ("input", inp), ("output", out)):
        if (s or name == "kernel") and (not s.isalpha() or len(set(s)) != len(s)):
            raise RuleError(
                f"einsum_layout({equation!r}): the {name} operand {s!r} must name each "
                "axis with one distinct letter."
            )
    return spec, inp, out


def einsum_layout(equation: str, role: Role = "weight", *, kernel: int = 1) -> Layout:
    """The layout between a flax kernel used as `jnp.einsum(equation, x, kernel)` and the torch
    tensor of the `Linear` that computes the same map.

    `role`: `"weight"`, torch `nn.Linear.weight` `(prod(out axes), prod(in axes))`;
    `"weight_in_out"`, the same transposed `(prod(in), prod(out))`, as GPT-2's `Conv1D`;
    `"bias"`, the bias of that projection: a flax bias over the out axes (in the output's
    order, as `nn.Einsum` keeps it) is torch's `(prod(out),)`. `kernel`: which operand is the
    kernel (1: `"BTE,ENH->BTNH"`; 0: `"ENH,BTE->BTNH"`).

    Example: `einsum_layout("BTE,ENH->BTNH")` maps a query kernel `(e, n, h)` to
    `q_proj.weight (n*h, e)`; `einsum_layout("BTNH,NHE->BTE")` an output kernel `(n, h, e)` to
    `o_proj.weight (e, n*h)`.

    Args:
        equation: the einsum equation, as the layer calls it.
        role: what the torch tensor is (see above).
        kernel: the kernel's operand index.

    Returns:
        The `Layout` (an exact reshape + transpose).
    """
    if role not in _ROLES:
        raise RuleError(f"einsum_layout({equation!r}): role is one of {_ROLES}, got {role!r}")
    spec, inp, out = _operands(equation, kernel)
    batch = [c for c in spec if c in inp and c in out]
    alone = [c for c in spec if c not in inp and c not in out]
    if batch or alone:
        what = f"batch axes {batch} (in the input, the kernel and the output)" if batch else ""
        what += (" and " if batch and alone else "") + (
            f"axes {alone} only the kernel has (summed away)" if alone else ""
        )
        raise RuleError(
            f"einsum_layout({equation!r}): the kernel {spec!r} has {what}, so it is not one "
            "torch Linear weight. Map it with an explicit Layout, or split it into one "
            "Linear per batch index with Stacked."
        )
    outs = [c for c in out if c in spec]
    ins = [c for c in inp if c in spec]
    if not outs or not ins:
        raise RuleError(
            f"einsum_layout({equation!r}): the kernel {spec!r} needs at least one axis in the "
            f"output and one contracted with the input, got out {outs}, in {ins}."
        )
    if role == "bias":
        return EinsumLayout(merge=(len(outs),), equation=equation, role=role)
    order = outs + ins if role == "weight" else ins + outs
    merge = (len(outs), len(ins)) if role == "weight" else (len(ins), len(outs))
    perm = tuple(order.index(c) for c in spec)
    return EinsumLayout(perm=perm, merge=merge, equation=equation, role=role)


def _equation_of(module: Any) -> str:
    equation = getattr(module, "einsum_str", None)
    if not isinstance(equation, str):
        raise RuleError(
            f"{type(module).__name__} has no einsum_str attribute (it is passed at call time), "
            "so its layout cannot be derived: give the rule with the equation, e.g. "
            "rules={'<torch name>': Rule(Map('weight', 'kernel', layout=einsum_layout("
            "'BTE,ENH->BTNH')), Map('bias', 'bias', layout=einsum_layout('BTE,ENH->BTNH', "
            "'bias')))}."
        )
    return equation


def einsum_kernel_layout(module: Any, shape: tuple[int, ...]) -> Layout:
    """A layer's kernel by its own `einsum_str` (flax's `nn.Einsum`) <-> Linear weight."""
    return einsum_layout(_equation_of(module))


def einsum_bias_layout(module: Any, shape: tuple[int, ...]) -> Layout:
    """A layer's bias over its einsum's out axes (flax's `nn.Einsum`) <-> Linear bias."""
    return einsum_layout(_equation_of(module), "bias")
