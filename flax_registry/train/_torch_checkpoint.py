"""A PyTorch training checkpoint <-> a `TrainState`, in one call each way.

The usual checkpoint of a PyTorch training loop is

    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch,
                "rng_state": torch.get_rng_state(), "scaler": scaler.state_dict()}, path)

`from_torch_checkpoint` reads such a file without torch (or such a dict in memory) into a
`TrainState` that continues the run exactly, and returns every other entry as it was saved;
`to_torch_checkpoint` writes the dict back for `torch.save`, which PyTorch's
`model.load_state_dict`, `optimizer.load_state_dict` and `scheduler.load_state_dict` accept.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

from .._frontend import ModuleDef
from .._gc_pause import collection_paused
from .._patterns import Patterns
from ..convert import from_torch, to_torch
from ._labels import DEFAULT, group_list
from ._optim import TorchOptimizer
from ._scaler import GradScaler
from ._scheduler_state import (
    check_arguments,
    check_scheduler_state,
    common_scheduler,
    scheduler_state_dict,
    torch_scheduler_class,
)
from ._schedules import TorchLR
from ._state import TrainState, create_train_state
from ._torch_checkpoint_entries import (
    ROLES,
    TorchCheckpointExtras,
    describe,
    find_entry,
    is_grad_scaler,
    listing,
    materialize,
    to_torch_tree,
)
from ._torch_optimizer_export import export_optimizer_state
from ._torch_optimizer_state import Groups, optimizer_state_from_torch

_NO_SCALER = (
    "{name}: loss_scale=True, but the checkpoint has {found} GradScaler state entries (one is "
    "needed); its entries are {listing}."
)
_NO_SCHEDULER = (
    "{name}: the learning rates here follow {spec}, but the checkpoint has no scheduler state "
    "(entries: {listing}), so the step the schedule has reached is unknown. Fix: pass "
    "scheduler_key='<entry>', or give the optimizer a constant lr."
)
_UNUSED_SCHEDULER = (
    "{name}: entry {key!r} is the state of a PyTorch {cls}, but every group's "
    "lr here is a constant. Fix: pass lr=fr.train.{cls}(...).schedule(lr) to each group's "
    "optimizer (or scheduler_key=... naming another entry)."
)


@collection_paused()
def from_torch_checkpoint(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    module: ModuleDef,
    tx: optax.GradientTransformation,
    *,
    frozen: Patterns = (),
    param_groups: Groups = (),
    rng: int | jax.Array = 0,
    step: int | None = None,
    model_key: str | None = None,
    optimizer_key: str | None = None,
    scheduler_key: str | None = None,
    group_order: Sequence[str] | None = None,
    frozen_in_optimizer: bool | None = None,
    example_inputs: Any = None,
    rules: Any = None,
    renames: Any = None,
    tied: Mapping[str, str] | None = None,
    dtype: Any = None,
    shardings: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    loss_scale: bool = False,
) -> tuple[TrainState, TorchCheckpointExtras]:
    """Resume a PyTorch training run: a `TrainState` holding the checkpoint's model,
    optimizer state and schedule position, and the checkpoint's other entries.

    The counterpart of `ckpt = torch.load(path); model.load_state_dict(ckpt["model"]);
    optimizer.load_state_dict(ckpt["optimizer"]); scheduler.load_state_dict(ckpt["scheduler"])`,
    without torch: a path is read by `flax_registry.io.load_torch_object` (allow-list
    unpickler, nothing executed); a dict (`torch.load`'s result) works too.

    `tx`, `frozen`, `param_groups` and `rng` are `create_train_state`'s; each group's optimizer
    is a `fr.train.torch_sgd/torch_adam/torch_adamw` with PyTorch's hyper-parameters, its
    `lr` a number or `<Scheduler>(...).schedule(lr)` with PyTorch's scheduler (stepped once per
    optimizer step). Everything is checked against the checkpoint: the model strictly (as
    `from_torch`, whose `example_inputs`, `rules`, `renames`, `tied`, `dtype`, `shardings`,
    `mesh` apply), the optimizer type, every group's size and hyper-parameters, every state
    tensor's shape, the scheduler's arguments, `base_lrs` and last learning rates; errors
    name the entry, group or parameter and both values.

    Entries are found by their structure (a state dict, `{'state', 'param_groups'}`, a dict
    with `last_epoch`) unless `model_key` / `optimizer_key` / `scheduler_key` name them.
    Parameter indices follow the checkpoint's model state_dict order (`model.parameters()`):
    see `optimizer_state_from_torch` for `group_order` and `frozen_in_optimizer`. `step`:
    steps taken, needed only for SGD with momentum and no scheduler (SGD saves no count).

    `loss_scale=True` continues a mixed-precision run: the checkpoint's
    `torch.amp.GradScaler` state (scale, growth tracker, constants) becomes the state's
    `loss_scale` (a `fr.train.GradScaler`: the step scales the loss, skips steps on overflow
    and moves the scale as PyTorch's does), and `to_torch_checkpoint` writes it back in its
    entry. Without it, the scaler's entry is kept as an extra, unchanged.

    Returns `(state, extras)`: `extras` holds every other entry (epoch, RNG states, GradScaler
    state, ...), never dropped, and what `to_torch_checkpoint` needs to write the checkpoint
    back as it came.
    """
    args = dict(
        module=module, tx=tx, frozen=frozen, param_groups=param_groups, rng=rng, step=step,
        model_key=model_key, optimizer_key=optimizer_key, scheduler_key=scheduler_key,
        group_order=group_order, frozen_in_optimizer=frozen_in_optimizer,
        example_inputs=example_inputs, rules=rules, renames=renames, tied=tied, dtype=dtype,
        shardings=shardings, mesh=mesh, loss_scale=loss_scale,
    )  # fmt: skip
    if isinstance(checkpoint, str | os.PathLike):
        from ..io import load_torch_object

        with load_torch_object(checkpoint) as obj:
            return _from_object(obj.obj, str(checkpoint), args)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(
            f"checkpoint must be a path to a torch.save file or the dict torch.load returned, "
            f"got {type(checkpoint).__name__}."
        )
    return _from_object(checkpoint, "checkpoint", args)


def _from_object(
    obj: Any, name: str, args: Mapping[str, Any]
) -> tuple[TrainState, TorchCheckpointExtras]:
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{name}: the checkpoint holds {describe(obj)}, not a dict. Expected a training "
            "checkpoint such as torch.save({'model': ..., 'optimizer': ...}, path)."
        )
    module, tx = args["module"], args["tx"]
    keys = {
        "model": find_entry(obj, "model", args["model_key"], name, True),
        "optimizer": find_entry(obj, "optimizer", args["optimizer_key"], name, True),
        "scheduler": find_entry(obj, "scheduler", args["scheduler_key"], name, False),
    }
    groups = group_list(args["param_groups"])
    txs: dict[str, Any] = {DEFAULT: tx, **{str(g.name): g.tx for g in groups}}
    sched_state = obj[keys["scheduler"]] if keys["scheduler"] is not None else None
    schedules = [t.hyperparams["lr"] for t in txs.values() if isinstance(t, TorchOptimizer)]
    schedules = [lr for lr in schedules if isinstance(lr, TorchLR)]
    if sched_state is not None and schedules:  # the class first: clearer than an lr mismatch
        check_arguments(materialize(sched_state), schedules[0].scheduler)
    if sched_state is not None and not schedules:
        cls = torch_scheduler_class(sched_state) or "LRScheduler"
        raise ValueError(_UNUSED_SCHEDULER.format(name=name, key=keys["scheduler"], cls=cls))
    if sched_state is None and schedules:
        spec = schedules[0].scheduler.describe()
        raise ValueError(_NO_SCHEDULER.format(name=name, spec=spec, listing=listing(obj)))
    model_sd = obj[keys["model"]]
    variables, report = from_torch(
        module,
        model_sd,
        example_inputs=args["example_inputs"],
        rules=args["rules"],
        renames=args["renames"],
        tied=args["tied"],
        dtype=args["dtype"],
        shardings=args["shardings"],
        mesh=args["mesh"],
    )
    state = create_train_state(
        module, variables, tx, rng=args["rng"], frozen=args["frozen"], param_groups=groups
    )
    renamed = dict(report.renamed)
    dropped = {k for k, _ in report.dropped}
    order = [renamed.get(k, k) for k in model_sd if k not in dropped]
    step, source = args["step"], "step"
    if sched_state is not None:
        last_epoch = int(sched_state["last_epoch"])
        if step is not None and step != last_epoch:
            raise ValueError(
                f"{name}: step={step} was passed, but the scheduler's last_epoch is "
                f"{last_epoch}. Fix: drop step=; the scheduler's count is used."
            )
        step, source = last_epoch, "the scheduler's last_epoch"
    state, layout = optimizer_state_from_torch(
        state,
        obj[keys["optimizer"]],
        tx,
        param_groups=groups,
        step=step,
        group_order=args["group_order"],
        frozen_in_optimizer=args["frozen_in_optimizer"],
        param_order=order,
        example_inputs=args["example_inputs"],
        rules=args["rules"],
        tied=args["tied"],
        step_source=source,
    )
    lrs = [(g.label, txs[g.label].hyperparams["lr"]) for g in layout.groups if g.label in txs]
    spec = common_scheduler(lrs)
    if spec is not None and sched_state is None:
        raise ValueError(
            _NO_SCHEDULER.format(name=name, spec=spec.describe(), listing=listing(obj))
        )
    extras = TorchCheckpointExtras(
        {k: materialize(v) for k, v in obj.items() if k not in keys.values()}
    )
    extras.entries, extras.order = keys, list(obj)
    extras.model_report, extras.optimizer_layout = report, layout
    scalers = [k for k, v in extras.items() if is_grad_scaler(v)]
    if args["loss_scale"] and len(scalers) != 1:
        raise ValueError(_NO_SCALER.format(name=name, found=scalers, listing=listing(obj)))
    if args["loss_scale"]:  # torch.amp.GradScaler's state: the state's loss scale
        extras.scaler_key = scalers[0]
        state = state.replace(loss_scale=GradScaler.from_state_dict(extras.pop(scalers[0])))
    if sched_state is not None:
        if spec is None:
            cls = torch_scheduler_class(sched_state) or "LRScheduler"
            raise ValueError(_UNUSED_SCHEDULER.format(name=name, key=keys["scheduler"], cls=cls))
        extras.scheduler = check_scheduler_state(materialize(sched_state), lrs)
    return state, extras


def to_torch_checkpoint(
    state: TrainState,
    tx: optax.GradientTransformation,
    *,
    param_groups: Groups = (),
    extras: Mapping[str, Any] | None = None,
    keys: Mapping[str, str] | None = None,
    as_torch: bool = True,
    group_order: Sequence[str] | None = None,
    frozen_in_optimizer: bool = False,
    example_inputs: Any = None,
    rules: Any = None,
    tied: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The PyTorch training checkpoint of `state`: `{"model": ..., "optimizer": ...,
    "scheduler": ..., **extras}` for `torch.save`, which `model.load_state_dict(strict=True)`,
    `optimizer.load_state_dict` and `scheduler.load_state_dict` of the PyTorch twin accept
    (the inverse of `from_torch_checkpoint`).

    `tx` and `param_groups` are `create_train_state`'s (their hyper-parameters and schedules
    become PyTorch's `param_groups` and scheduler state). `extras` (from
    `from_torch_checkpoint`) writes the checkpoint back as it came: its entry names and order,
    the model's key names and dtypes, the optimizer's group layout and kept entries, and every
    other entry (update e.g. `extras["epoch"]` first); a plain dict adds its entries. `keys`
    renames the roles (`{"model": "model_state_dict"}`). Without a schedule no scheduler entry
    is written. Tensors are torch tensors (`as_torch=False`: NumPy arrays, no torch needed).
    """
    info = extras if isinstance(extras, TorchCheckpointExtras) else None
    names = {role: role for role in ROLES}
    if info is not None:
        names.update({role: key for role, key in info.entries.items() if key is not None})
    names.update(keys or {})
    report = info.model_report if info is not None else None
    model_sd = to_torch(
        state.module,
        state.variables,
        as_torch=as_torch,
        example_inputs=example_inputs,
        rules=rules,
        tied=tied,
        report=report,
    )
    layout = info.optimizer_layout if info is not None else None
    opt_sd, groups_info = export_optimizer_state(
        state,
        tx,
        param_groups,
        layout,
        group_order,
        frozen_in_optimizer,
        example_inputs,
        rules,
        tied,
    )
    lrs = [(label, otx.hyperparams["lr"]) for label, _, otx in groups_info if otx is not None]
    spec = common_scheduler(lrs)
    entries: dict[str, Any] = {names["optimizer"]: opt_sd}
    if spec is not None:
        counts = {count for _, count, otx in groups_info if otx is not None}
        if len(counts) > 1:
            raise ValueError(
                f"the groups have taken different numbers of steps ({sorted(counts)}), but one "
                "PyTorch scheduler counts the steps of all groups: it cannot be written."
            )
        like = info.scheduler.state if info is not None and info.scheduler is not None else None
        use_beta1 = any(otx is not None and otx.torch_class != "SGD" for _, _, otx in groups_info)
        schedules = [lr for _, lr in lrs if isinstance(lr, TorchLR)]
        entries[names["scheduler"]] = scheduler_state_dict(
            schedules, counts.pop(), use_beta1=use_beta1, like=like
        )
    if state.loss_scale is not None:  # as torch.amp.GradScaler.state_dict()
        scaler_key = info.scaler_key if info is not None and info.scaler_key else "scaler"
        entries[scaler_key] = state.loss_scale.state_dict()
    for key, value in (extras or {}).items():
        if key in entries or key == names["model"]:
            raise ValueError(f"extras entry {key!r} has the name of the {key} entry; rename it.")
        entries[key] = value
    entries = {names["model"]: model_sd, **(to_torch_tree(entries) if as_torch else entries)}
    if info is not None and info.order:
        rank = {k: i for i, k in enumerate(info.order)}
        entries = dict(sorted(entries.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    return entries
