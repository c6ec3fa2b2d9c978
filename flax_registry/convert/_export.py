"""`to_torch`: a Flax model's variables as its PyTorch `state_dict` (the inverse of
`from_torch`, over the same plan): torch keys, torch layouts, PyTorch's order; with the
conversion's `LoadReport`, the checkpoint exactly as it came."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from .. import _nested
from .._arrays import numpy_to_torch
from .._frontend import frontend_of
from .._gc_pause import collection_paused
from ._plan import Entry, Plan, make_plan
from ._report import LoadReport
from ._rules import Rules

_NOT_CONCRETE = (
    "to_torch needs concrete variables: flax variable '{where}' (torch key '{key}') is abstract "
    "({leaf}). Pass the variables that init / from_torch returned."
)


def _export(plan: Plan, e: Entry, variables: Mapping[str, Any]) -> np.ndarray:
    pieces = []
    for part in e.parts:
        try:
            leaf = _nested.get(variables, (part.collection, *part.path))
        except (KeyError, TypeError):
            raise KeyError(
                f"to_torch: flax variable '{part.where}' (torch key '{e.key}') is not in the "
                f"variables passed; pass the complete variables of {plan.cls}."
            ) from None
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise ValueError(_NOT_CONCRETE.format(where=part.where, key=e.key, leaf=leaf))
        pieces.append(part.layout.to_torch(part.take(np.asarray(leaf))))
    array = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=e.axis)
    return array if array.flags.writeable else array.copy()


@collection_paused()
def to_torch(
    module: Any,
    variables: Mapping[str, Any] | None = None,
    *,
    as_torch: bool = False,
    example_inputs: Any = None,
    rules: Rules | None = None,
    tied: Mapping[str, str] | None = None,
    report: LoadReport | None = None,
) -> dict[str, Any]:
    """The PyTorch `state_dict` of `module` with `variables`: torch keys, torch layouts, in the
    torch model's order, accepted by `torch_model.load_state_dict(sd, strict=True)`.

    Values are NumPy arrays (bfloat16/float8 as `ml_dtypes`), or torch tensors with
    `as_torch=True` (bit-exact, bf16 included). Tied keys (a `tie_parameters` tie, or `tied=`
    as in `from_torch`) appear under every name. Non-persistent buffers are left out, as
    PyTorch leaves them out. Torch-only tensors are synthesised: `num_batches_tracked` is 0, a
    fresh torch module's value. Compact modules need `example_inputs` to know layer types.

    `report=` (the one `from_torch` returned) writes the checkpoint back as it came: its
    original key names (renames undone), dtypes (casts undone), order, and the values of the
    keys it dropped (`num_batches_tracked`), so torch -> flax -> torch is bit-identical.

    Args:
        module: the Flax model definition (unbound).
        variables: its concrete variables.
        as_torch: return torch tensors instead of NumPy arrays.
        example_inputs: inputs of `__call__` for compact models (not needed again for the
            module object `from_torch` converted into).
        rules: per-call conversion rules by layer type or module path.
        tied: extra torch keys that alias a model key.
        report: the `LoadReport` of the conversion to undo exactly.

    Returns:
        The PyTorch `state_dict`, `{key: array}`.

    Example:
        >>> import numpy as np, flax.linen as nn
        >>> import flax_registry as fr
        >>> dense = nn.Dense(2)
        >>> variables = {"params": {"kernel": np.arange(6.0).reshape(3, 2), "bias": np.zeros(2)}}
        >>> state = fr.to_torch(dense, variables)
        >>> list(state), state["weight"].shape   # torch keeps (out, in)
        (['weight', 'bias'], (2, 3))
    """
    frontend = frontend_of(module)
    if variables is None:
        variables = frontend.variables_of(module)
    plan = make_plan(module, variables, example_inputs, rules, tied)
    result: dict[str, Any] = {}
    for key in plan.order:
        if key in plan.entries:
            result[key] = _export(plan, plan.entries[key], variables)
        elif key in plan.aliases:
            canonical = plan.aliases[key]
            result[key] = result.get(canonical)
            if result[key] is None:
                result[key] = _export(plan, plan.entries[canonical], variables)
        else:
            value, _ = plan.extras[key]
            if report is not None and key in report.extras:
                value = report.extras[key]
            result[key] = np.array(value)
    if report is not None:
        result = _restore(result, report)
    if as_torch:
        if "torch" not in sys.modules:
            import torch  # noqa: F401
        converted: dict[int, Any] = {}
        for key, array in result.items():  # aliases stay one tensor, as in torch
            if id(array) not in converted:
                converted[id(array)] = numpy_to_torch(array)
            result[key] = converted[id(array)]
    return result


def _dtype_named(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def _restore(result: dict[str, Any], report: LoadReport) -> dict[str, Any]:
    """Undo a conversion's renames and casts; order as the checkpoint it came from."""
    original = {target: source for source, target in report.renamed}
    restored: dict[str, Any] = {}
    cast: dict[tuple[int, str], Any] = {}  # aliases stay one array
    for key, array in result.items():
        name = original.get(key, key)
        stored = report.source_dtypes.get(name)
        if stored is not None and str(array.dtype) != stored:
            ident = (id(array), stored)
            if ident not in cast:
                cast[ident] = array.astype(_dtype_named(stored))
            array = cast[ident]
        restored[name] = array
    for alias, key in report.checkpoint_aliases.items():  # one tensor in the checkpoint
        if key in result:
            restored[original.get(alias, alias)] = restored[original.get(key, key)]
    rank = {key: i for i, key in enumerate(report.source_order)}
    order = sorted(restored, key=lambda k: rank.get(k, len(rank)))
    return {k: restored[k] for k in order}
