"""`from_torch`: PyTorch state_dicts and checkpoints into any Flax model.

Over the plan of `_plan.make_plan`: reads one tensor at a time from a lazy source, checks every
name and shape before reading any data, converts the layout exactly and places the result (on
the default device, or per device with shardings). `_export.to_torch` is the way back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _messages as messages
from .. import _nested
from .._frontend import frontend_of
from .._gc_pause import collection_paused
from .._patterns import as_patterns, matches_any
from ._checks import explain, incomplete
from ._dtypes import DtypePolicy, resolve_dtype
from ._plan import Plan, make_plan
from ._report import LoadReport
from ._rules import Rules
from ._sharding import Piece, ShardingSpec, Task, place_all, resolve_sharding
from ._source import Source, open_source

Renames = Mapping[str, str] | Sequence[tuple[str, str]] | Callable[[str], str | None]

_PROVIDE_OR_INIT = (
    "Provide these keys, pass init=[<glob patterns>] to initialise them from the model's "
    "initializers (e.g. a new head: init='classifier.*'), or pass concrete variables= (e.g. "
    "from {cls}.init) whose current values should be kept."
)
_TIE_DIFFERS = (
    "tied keys {a!r} and {b!r} are one variable in {cls}, but the checkpoint holds different "
    "values for them. Fix: load only one of them (renames=... returning None drops a key), or "
    "untie the parameters in the model."
)
_RAW_MISMATCH = (
    "{key} belongs to {layer}, a layer without a conversion rule, whose variables are loaded "
    "under their own names, unchanged: if the layer stores it in another layout (e.g. a "
    "(in, out) kernel where torch has (out, in)), register a rule for {layer} with "
    "flax_registry.convert.register_rule (layout=LINEAR for a transpose)."
)
_INIT_NOTHING = (
    "init={patterns} matches no torch key of {cls}; its keys are {keys}... Patterns are globs "
    "over torch names, e.g. init='classifier.*'."
)
_NEEDS_CONCRETE = (
    "init= cannot initialise {keys} of {cls}: the model is abstract (nnx.eval_shape keeps no "
    "values), and an NNX model's initial values are the ones its constructor made. Construct "
    "the model (cls(..., rngs=nnx.Rngs(seed))) to take those keys' values from it."
)
_NO_NON_PERSISTENT = (
    "cannot load into {cls}: its non-persistent buffers {keys} hold no value (the model is "
    "abstract, as nnx.eval_shape makes it) and no checkpoint holds them (PyTorch computes "
    "them in __init__). Make the abstract model with flax_registry.nnx.eval_shape(...), which "
    "keeps their values, or construct the model."
)
_REPLACED = "replaced by a fresh initialisation (init=)"
_NEEDS_INPUTS = (
    "init= cannot initialise {keys} of {cls}: init without inputs does not create them (flax "
    "layers create their variables when first called). Pass example_inputs= (the inputs "
    "{cls}.init needs)."
)


def _apply_renames(key: str, renames: Renames | None) -> str | None:
    if renames is None:
        return key
    if callable(renames) and not isinstance(renames, Mapping):
        return renames(key)
    pairs = renames.items() if isinstance(renames, Mapping) else renames
    for pattern, repl in pairs:
        key = re.sub(pattern, repl, key)
    return key


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@collection_paused()
def from_torch(
    module: Any,
    source: Any,
    *,
    variables: Any = None,
    example_inputs: Any = None,
    strict: bool = True,
    rules: Rules | None = None,
    renames: Renames | None = None,
    tied: Mapping[str, str] | None = None,
    dtype: DtypePolicy = None,
    shardings: ShardingSpec = None,
    mesh: jax.sharding.Mesh | None = None,
    entry: str | None = None,
    init: str | Sequence[str] | None = None,
    init_rng: Any = None,
) -> tuple[dict[str, Any], LoadReport]:
    """Load a PyTorch `state_dict` or checkpoint into `module`'s variables (all collections).

    `source`: a mapping of torch names to arrays / torch tensors, or a path
    `flax_registry.io.open_checkpoint` accepts (`.safetensors`, sharded `*.index.json`,
    `torch.save` zip `.pt/.pth/.bin`, a directory; `entry=` names a nested state dict).

    The target structure comes from abstract shapes (`jax.eval_shape`); no weights are
    initialised. Modules that register in `setup()` (every `flax_registry` module, and flax
    modules whose layers are `setup()` attributes) need nothing else. Compact modules (layers
    created in `__call__`) need `example_inputs=(x,)` (the arguments `init` takes), which give
    both the shapes and the layer types; or pass `variables=` (abstract or concrete) for the
    shapes, plus `example_inputs` if layers are compact. With concrete `variables`, keys that
    `strict=False` leaves unloaded keep their values there.

    Keys: `flax_registry.Module`s use their registered names; flax layers map by the rule of
    their module path or type (`rules={"decoder.layers": Scanned(), MyLayer: Rule(...)}`, see
    `flax_registry.convert.register_rule`), lists give `layers.0`. Layouts unlike PyTorch's
    are rules too: `Stacked` (several keys as one variable on a new axis), `Scanned` (an
    `nn.scan` module's `(L, ...)` variables as `layers.{i}`), `Child` (a renamed submodule),
    `einsum_layout` (a kernel shaped for its einsum). A variable several keys fill loads whole
    (each key read on its own, one layer at a time) or not at all. `renames`
    rewrites checkpoint keys first: `{regex: replacement}` applied in order (e.g.
    `{r"^module\\.": ""}`), or a callable returning the new key or None to drop it. `tied`
    declares extra torch keys that alias a model key (`{"lm_head.weight": "embed.weight"}`
    for a flax model that reuses its embedding); any alias may be present, all present ones
    must be equal.

    `dtype`: None keeps the model's dtype (cast listed in the report), "checkpoint" keeps the
    checkpoint's, a dtype casts floating tensors, `{collection: dtype}` per collection, or a
    callable `(key, checkpoint dtype, model dtype)`. bf16/fp16 are read as they are stored.

    `shardings` / `mesh`: place each variable by its sharding, read per device from the
    slices it needs (see `_sharding.resolve_sharding`; a stacked or scanned variable is named
    by its first key, `layers.0.mlp.up_proj.weight`, and a device holding layers 8-11 reads
    only theirs); without them, abstract targets carrying shardings and concrete `variables`
    keep their placement, others go to the default device.

    `init`: glob patterns over torch keys (`"classifier.*"`) whose variables are freshly
    initialised by the model's own initializers instead of loaded, for fine-tuning with a new
    head; the checkpoint's tensors under those keys are dropped (listed in the report), and
    only the chosen variables are computed (`init_rng`, default `jax.random.key(0)`).

    A buffer that a PyTorch module added in a later version (`num_batches_tracked`) may be
    missing from a state dict without version metadata, as PyTorch allows; it then keeps its
    current value (0 for abstract variables), listed in `LoadReport.defaulted`.

    An NNX model holds its variables: `from_torch(model, source)` loads into it in place (an
    abstract model from `nnx.eval_shape` too) and returns `(model, LoadReport)`.

    Differences from `torch.nn.Module.load_state_dict`: returns `(variables, LoadReport)`;
    every name, shape and tie is checked before any tensor is read, and nothing is copied when
    it raises; `strict=True` raises in PyTorch's format for missing, unexpected and
    size-mismatched keys, while `strict=False` returns them in the report (PyTorch raises on a
    size mismatch even then) but still refuses to leave a variable abstract.
    Python's cyclic garbage collector is paused while it runs (`_gc_pause`).

    Args:
        module: the Flax model definition (unbound).
        source: a state dict or a checkpoint path.
        variables: the target's structure (abstract or concrete); default: from the module.
        example_inputs: inputs of `__call__` for compact models (tuple, dict or `Inputs`).
        strict: raise on missing, unexpected or mismatched keys.
        rules: per-call conversion rules by layer type or module path.
        renames: checkpoint key rewrites.
        tied: extra torch keys that alias a model key.
        dtype: the dtype policy.
        shardings: where each array goes (`flax_registry._shardings`), with `mesh`.
        mesh: the mesh that `PartitionSpec`s refer to.
        entry: the nested state dict of a checkpoint file.
        init: glob patterns of keys to initialise freshly instead of loading.
        init_rng: the key for `init`.

    Returns:
        `(variables, LoadReport)`.

    Example:
        >>> import numpy as np, flax.linen as nn
        >>> import flax_registry as fr
        >>> class Net(nn.Module):
        ...     def setup(self):
        ...         self.fc = nn.Dense(2)
        ...     def __call__(self, x):
        ...         return self.fc(x)
        >>> torch_state = {"fc.weight": np.ones((2, 3), np.float32), "fc.bias": np.zeros(2, np.float32)}
        >>> variables, report = fr.from_torch(Net(), torch_state, example_inputs=(np.ones((1, 3)),))
        >>> variables["params"]["fc"]["kernel"].shape   # flax keeps (in, out)
        (3, 2)
        >>> report.ok
        True
    """
    frontend = frontend_of(module)
    in_place = frontend.holds_state and variables is None
    if in_place:
        variables = frontend.variables_of(module)
    plan = make_plan(module, variables, example_inputs, rules, tied)
    if in_place:
        unset = [
            key
            for key, (collection, path) in plan.nonpersistent.items()
            if isinstance(_nested.get(plan.target, (collection, *path), None), jax.ShapeDtypeStruct)
        ]
        if unset:
            raise ValueError(_NO_NON_PERSISTENT.format(cls=plan.cls, keys=unset))
    report = LoadReport(cls=plan.cls)
    report.skipped_nonpersistent = list(plan.nonpersistent)
    report.tied_aliases = list(plan.aliases.items())
    patterns = as_patterns(init)
    fresh = {k for k in plan.entries if matches_any(k, patterns)}
    if patterns and not fresh:
        raise ValueError(
            _INIT_NOTHING.format(
                patterns=list(patterns), cls=plan.cls, keys=list(plan.entries)[:10]
            )
        )
    report.initialized = [k for k in plan.entries if k in fresh]
    with open_source(source, entry) as src:
        chosen, missing = _match(plan, src, renames, report, fresh)
        if strict and not report.ok:
            raise report.error(list(plan.entries))
        defaulted = set(report.defaulted)
        why = {k: "size mismatch" for k, _, _ in report.shape_mismatches}
        why.update({k: "init=" for k in fresh} | {k: "defaulted" for k in defaulted})
        incomplete(plan, missing | fresh | defaulted, why, report.hints)
        abstract = [
            key
            for key, e in plan.entries.items()
            if (key in missing or key in defaulted)
            and key not in fresh
            and any(isinstance(p.leaf, jax.ShapeDtypeStruct) for p in e.parts)
        ]
        zeros = [k for k in abstract if k in defaulted]  # what a new torch module holds
        abstract = [k for k in abstract if k not in defaulted]
        if abstract:
            raise messages.abstract_left(plan.cls, abstract, _PROVIDE_OR_INIT.format(cls=plan.cls))
        _check_ties(plan, src, {k: v for k, v in chosen.items() if k not in missing})
        out = (
            _nested.copy_dicts(variables) if variables is not None else {c: {} for c in plan.target}
        )
        loading = [k for k in plan.entries if k not in missing | fresh | defaulted]
        tasks = _tasks(plan, loading, chosen, src, dtype, shardings, mesh, report)

        def done(task: Task, array: jax.Array) -> None:
            _nested.set_leaf(out, (task.part.collection, *task.part.path), array)
            src.release()

        place_all(src, tasks, done)
    for key in zeros:
        for part in plan.entries[key].parts:
            value = jnp.zeros(part.variable_shape, part.leaf.dtype)
            _nested.set_leaf(out, (part.collection, *part.path), value)
    if fresh:
        _initialise(
            module,
            plan,
            sorted(fresh, key=report.initialized.index),
            init_rng,
            out,
            shardings,
            mesh,
        )
    loaded = _nested.drop_abstract(out)
    if in_place:
        return frontend.update(module, loaded), report
    return loaded, report


def _initialise(
    module: Any,
    plan: Plan,
    keys: list[str],
    rng: Any,
    out: dict[str, Any],
    shardings: ShardingSpec,
    mesh: Any,
) -> None:
    """Fresh values from the model's initializers for the variables of `keys`, into `out`."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    parts = []
    for key in keys:  # a variable several keys fill: once, named by its first key
        for part in plan.entries[key].parts:
            if (part.collection, part.path) not in seen:
                seen.add((part.collection, part.path))
                parts.append((key, part))
    idents = [(p.collection, p.path) for _, p in parts]
    assert plan.frontend is not None
    rng = jax.random.key(0) if rng is None else rng
    values = plan.frontend.initial_values(module, plan.inputs, rng, idents)
    absent = [key for key, p in parts if values.get((p.collection, p.path)) is None]
    if absent:
        template = _NEEDS_CONCRETE if plan.frontend.holds_state else _NEEDS_INPUTS
        raise ValueError(template.format(keys=absent, cls=plan.cls))
    for key, part in parts:
        value = values[(part.collection, part.path)]
        sharding = resolve_sharding(shardings, mesh, key, part)
        if sharding is not None:
            value = jax.device_put(value, sharding)
        _nested.set_leaf(out, (part.collection, *part.path), value)


def _match(
    plan: Plan,
    src: Source,
    renames: Renames | None,
    report: LoadReport,
    fresh: AbstractSet[str] = frozenset(),
) -> tuple[dict[str, list[str]], set[str]]:
    """Checkpoint keys for each model key (the first is loaded) and the model keys that cannot
    load (missing or size-mismatched); fills the report's lists. Reads no tensor data except
    the tiny torch-only values it drops."""
    report.source_order = list(src.keys)
    by_target: dict[str, list[str]] = {}
    for key in src.keys:
        report.source_dtypes[key] = str(src.dtype(key))
        target = _apply_renames(key, renames)
        if target is None:
            report.dropped.append((key, "renames returned None"))
            continue
        if target != key:
            report.renamed.append((key, target))
        by_target.setdefault(target, []).append(key)
    found: dict[str, list[tuple[str, str]]] = {}
    for target, keys in by_target.items():
        canonical = plan.aliases.get(target, target)
        if canonical in fresh:
            report.dropped.extend((k, _REPLACED) for k in keys)
        elif canonical in plan.entries:
            found.setdefault(canonical, []).extend((target, k) for k in keys)
        elif target in plan.extras:
            report.dropped.append((target, plan.extras[target][1]))
            report.extras[target] = src.read(keys[0])
        else:
            report.unexpected.extend([target] * len(keys))
    if report.unexpected:
        _checkpoint_aliases(src, by_target, found, report)
    chosen: dict[str, list[str]] = {}
    failed: set[str] = set()
    for key, e in plan.entries.items():
        pairs = found.get(key, [])
        if key in fresh:
            continue
        if not pairs and e.added_in is not None:
            version = src.version(key.rpartition(".")[0])
            if version is None or version < e.added_in:  # PyTorch keeps the current value
                report.defaulted.append(key)
                continue
        if not pairs:
            report.missing.append(key)
            report.shapes[key] = e.torch_shape
            failed.add(key)
            continue
        for target, k in pairs:
            if src.shape(k) != e.torch_shape:
                report.shape_mismatches.append((target, src.shape(k), e.torch_shape))
                if e.raw:
                    report.hints.append(_RAW_MISMATCH.format(key=target, layer=e.layer))
                failed.add(key)
        chosen[key] = [k for _, k in pairs]
    for target in report.unexpected:
        report.shapes.setdefault(target, src.shape(by_target[target][0]))
    explain(plan, src, report, chosen)
    return chosen, failed


def _checkpoint_aliases(
    src: Source,
    by_target: dict[str, list[str]],
    found: dict[str, list[tuple[str, str]]],
    report: LoadReport,
) -> None:
    """Unexpected keys that the checkpoint itself stores as the same tensor as a key that
    loads (`torch.save` keeps tied weights as one storage: `lm_head.weight` and
    `wte.weight` of a model whose flax twin calls `wte.attend`) are tied aliases, listed in
    the report, not unexpected: they hold no value of their own."""
    loaded: dict[Any, str] = {}
    for key, pairs in found.items():
        for _, k in pairs:
            region = src.region(k)
            if region is not None:
                loaded.setdefault(region, key)
    if not loaded:
        return
    still = []
    for target in report.unexpected:
        region = src.region(by_target[target][0])
        if region is not None and region in loaded:
            report.tied_aliases.append((target, loaded[region]))
            report.checkpoint_aliases[target] = loaded[region]
        else:
            still.append(target)
    report.unexpected[:] = still


def _check_ties(plan: Plan, src: Source, chosen: dict[str, list[str]]) -> None:
    for keys in chosen.values():
        if len(keys) > 1:
            first = src.read(keys[0])
            for other in keys[1:]:
                if not _same_bits(first, src.read(other)):
                    raise ValueError(_TIE_DIFFERS.format(a=keys[0], b=other, cls=plan.cls))


def _tasks(
    plan: Plan,
    keys: Sequence[str],
    chosen: Mapping[str, list[str]],
    src: Source,
    policy: DtypePolicy,
    shardings: ShardingSpec,
    mesh: Any,
    report: LoadReport,
) -> list[Task]:
    """What to place: a task per flax variable, with a piece per torch key that fills it (one,
    or several for a stacked or scanned variable), in the order of its first key; records
    each key's casts."""
    pieces: dict[tuple[str, tuple[str, ...]], list[tuple[Piece, np.dtype]]] = {}
    names: dict[tuple[str, tuple[str, ...]], str] = {}  # each variable's first model key
    for key in keys:
        e = plan.entries[key]
        src_key = chosen[key][0]
        source_dtype = src.dtype(src_key)
        offset = 0
        casts = set()
        for part in e.parts:
            dtype = resolve_dtype(
                policy, e.key, part.collection, source_dtype, np.dtype(part.leaf.dtype)
            )
            if dtype != source_dtype:
                casts.add(str(dtype))
            where = (e.axis, offset) if len(e.parts) > 1 else None
            piece = Piece(src_key, part, where)
            pieces.setdefault((part.collection, part.path), []).append((piece, dtype))
            names.setdefault((part.collection, part.path), e.key)
            if len(e.parts) > 1:
                offset += part.torch_shape[e.axis]
        for to in sorted(casts):
            if not _exact_integer_cast(src, src_key, source_dtype, np.dtype(to)):
                report.casts.append((e.key, str(source_dtype), to))
    tasks = []
    for ident, members in pieces.items():
        dtypes = {dtype for _, dtype in members}
        first = members[0][0]
        if len(dtypes) > 1:
            raise ValueError(
                f"flax variable '{first.part.where}' is one array filled by torch keys "
                f"{[p.key for p, _ in members][:6]}, but the dtype policy gives them different "
                f"dtypes {sorted(map(str, dtypes))}: give one dtype for all of them (dtype= "
                "per collection or a callable)."
            )
        sharding = resolve_sharding(shardings, mesh, names[ident], first.part)
        tasks.append(Task(tuple(p for p, _ in members), dtypes.pop(), sharding))
    return tasks


_EXACT_CHECK_LIMIT = 1 << 20  # elements: larger integer tensors are listed unchecked


def _exact_integer_cast(src: Source, key: str, source: np.dtype, target: np.dtype) -> bool:
    """An integer tensor whose every value the target integer type holds (int64 counters as
    int32 without x64): nothing changes, so the report does not list it. Its source dtype is
    still recorded for `to_torch(report=)`."""
    if source.kind not in "iu" or target.kind not in "iu":
        return False
    if np.can_cast(source, target, casting="safe"):
        return True
    if math.prod(src.shape(key)) > _EXACT_CHECK_LIMIT:
        return False
    values = src.read(key)
    if values.size == 0:
        return True
    info = np.iinfo(target)
    return bool(info.min <= values.min() and values.max() <= info.max)
