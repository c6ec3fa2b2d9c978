"""`CheckpointManager`: a module's training state as orbax steps (see the package docstring)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from .._arrays import default_prng_impl
from .._frontend import ModuleDef, frontend_of
from .._names import TorchNames as Layout
from .._names import torch_names as layout
from .._nested import leaf_paths, merge, without
from .._registry import PARAMS
from .._variables import abstract_variables as _abstract_variables
from .._variables import init_variables
from .._version import __version__
from . import _errors
from ._sharding import ShardingSpec, abstract_with_shardings

if TYPE_CHECKING:
    from ..train import TrainState

FORMAT = "flax_registry.checkpoint/1"
_ITEM_COLLECTION = {"params": PARAMS, "buffers": ""}  # buffers: keyed by collection already
ITEMS = ("params", "buffers", "opt_state", "meta")


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    return {
        "params": ocp.StandardCheckpointHandler(),
        "buffers": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


class CheckpointManager:
    """Save and restore a module's training state as orbax steps (see the module docstring).

    `max_to_keep` keeps the latest N steps (`None`: all), `save_interval_steps` saves every
    N-th step (`save` returns False for the others; preemption steps are always saved); pass
    orbax `preservation_policy` / `save_decision_policy` objects (e.g. `BestN`, `EveryNSteps`)
    for anything else, or a complete `options`. Saves are asynchronous unless
    `enable_async=False`: call `wait_until_finished()` (or use the manager as a context
    manager) before reading a step back or exiting; errors of a background save surface there.

    `abstract_variables` is only needed for modules whose variables are created in a compact
    `__call__` (`flax_registry.abstract_variables(module, *example_inputs)`).

    The PyTorch names of the variables are read from the registry once per module and
    variable structure (a walk of the module tree, cached for the process), not per save.
    """

    def __init__(
        self,
        directory: str | Path,
        module: ModuleDef,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        preservation_policy: Any = None,
        save_decision_policy: Any = None,
        enable_async: bool = True,
        abstract_variables: Mapping[str, Any] | None = None,
        options: ocp.CheckpointManagerOptions | None = None,
    ) -> None:
        module = frontend_of(module).unbound(module)
        self.module = module
        self._abstract = abstract_variables
        self._initial: dict[tuple[str, ...], jax.Array] | None = None
        if options is None:
            if preservation_policy is None and max_to_keep is not None:
                preservation_policy = policies.LatestN(max_to_keep)
            if save_decision_policy is None:
                save_decision_policy = policies.AnySavePolicy(
                    [
                        policies.FixedIntervalPolicy(save_interval_steps),
                        policies.PreemptionCheckpointingPolicy(),
                    ]
                )
            options = ocp.CheckpointManagerOptions(
                save_decision_policy=save_decision_policy,
                preservation_policy=preservation_policy,
                enable_async_checkpointing=enable_async,
                cleanup_tmp_directories=True,
            )
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_handlers()
        )

    # --- orbax passthroughs --------------------------------------------------------------

    @property
    def orbax_manager(self) -> ocp.CheckpointManager:
        """The underlying `orbax.checkpoint.CheckpointManager`."""
        return self._manager

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def wait_until_finished(self) -> None:
        """Block until the background save is committed; re-raises its error, if any."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- layout from the registry ----------------------------------------------------------

    @property
    def abstract_variables(self) -> Mapping[str, Any]:
        """The module's variables as `jax.ShapeDtypeStruct`s (nothing allocated)."""
        if self._abstract is None:
            self._abstract = _abstract_variables(self.module)
        return self._abstract

    def _layout(self, variables: Mapping[str, Any]) -> Layout:
        return layout(self.module, variables)

    def _recomputed(self, lay: Layout) -> dict[tuple[str, ...], jax.Array]:
        """Initial values of the non-persistent buffers (under jit, only they are computed)."""
        paths = sorted(_non_persistent(lay))
        if not paths:
            return {}
        if self._initial is None:

            def initial(key: jax.Array) -> list[Any]:
                variables = init_variables(self.module, key)
                out = []
                for collection, *path in paths:
                    value = variables[collection]
                    for part in path:
                        value = value[part]
                    out.append(value)
                return out

            self._initial = dict(zip(paths, jax.jit(initial)(jax.random.key(0))))
        return self._initial

    # --- save ---------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: TrainState | Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save a `TrainState` (params, persistent buffers, optimizer state, step and key) or
        plain variables (params and persistent buffers) as step `step`.

        Returns whether a save was started (the save-interval policy may skip the step;
        `force=True` saves anyway). With async saving the arrays are copied to the host
        before the call returns, so the state may be donated or changed right after.
        """
        if not force and not self._manager.should_save(step):
            return False
        variables: Mapping[str, Any] = (
            state.variables if _is_train_state(state) else cast(Mapping[str, Any], state)
        )
        lay = self._layout(variables)
        dropped = _non_persistent(lay)
        items: dict[str, Any] = {
            "params": variables[PARAMS],
            "buffers": without({c: v for c, v in variables.items() if c != PARAMS}, dropped),
        }
        if _is_train_state(state):
            items["opt_state"] = state.opt_state
        # orbax refuses an item without arrays ("Found empty item"): a model without buffers,
        # an optimizer without state. Such an item is recorded in `meta` only.
        empty = [k for k, v in items.items() if not jax.tree.leaves(v)]
        meta: dict[str, Any] = {
            "format": FORMAT,
            "flax_registry_version": _version(),
            "module": type(self.module).__name__,
            "step": int(step),
            "items": [*(k for k in items if k not in empty), "meta"],
            "empty_items": empty,
            "keymap": {k: [c, list(p)] for k, (c, p) in lay.state_dict_keys()},
            "non_persistent": sorted(lay.table[(c, tuple(p))].name for c, *p in dropped),
            "shapes": {k: _shapes(v) for k, v in items.items()},
        }
        if _is_train_state(state):
            meta["train_step"] = int(state.step)
            meta["rng"] = np.asarray(state.rng).tolist()
            meta["rng_impl"] = state.rng_impl or default_prng_impl()
        args = {k: ocp.args.StandardSave(v) for k, v in items.items() if k not in empty}
        args["meta"] = ocp.args.JsonSave(meta)
        return bool(
            self._manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=force)
        )

    # --- restore ------------------------------------------------------------------------

    def restore(
        self, target: TrainState, step: int | None = None, *, shardings: ShardingSpec = None
    ) -> TrainState:
        """Resume: the `TrainState` saved at `step` (default: the latest), restored into the
        structure of `target` (abstract or concrete; its values are not used).

        Build `target` with `create_train_state(module, fr.abstract_variables(module), tx, ...)`
        and the same `frozen` / `param_groups` as the saved run. `shardings` places the
        arrays: a `Sharding` for all, or a function `(name, abstract) -> Sharding` such as
        `sharding_rules(mesh, ...)`; by default each leaf keeps the sharding of `target`'s
        leaf, or goes to the default device.
        """
        lay = self._layout(target.variables)
        items = {
            "params": target.params,
            "buffers": without(target.buffers, _non_persistent(lay)),
            "opt_state": target.opt_state,
        }
        restored, meta = self._restore(step, items, shardings, lay, target.params)
        target_impl = target.rng_impl or default_prng_impl()
        if meta.get("rng_impl", target_impl) != target_impl:
            raise ValueError(
                _errors.RNG_IMPL.format(
                    step=meta["step"], saved=meta["rng_impl"], target=target_impl
                )
            )
        recomputed = self._placed_recomputed(lay, target.buffers, shardings, target.params)
        return target.replace(
            step=np.asarray(meta.get("train_step", meta["step"]), np.int32),
            params=restored["params"],
            buffers=merge(restored["buffers"], recomputed),
            opt_state=restored["opt_state"],
            rng=np.asarray(meta["rng"], np.uint32) if "rng" in meta else target.rng,
        )

    def restore_variables(
        self, step: int | None = None, *, shardings: ShardingSpec = None
    ) -> dict[str, Any]:
        """Parameters and buffers only (inference, fine-tuning with a new optimizer): the
        variables of step `step` (default: the latest), restored into the module's abstract
        variables, non-persistent buffers recomputed. `shardings` as in `restore`."""
        abstract = self.abstract_variables
        lay = self._layout(abstract)
        buffers = {c: v for c, v in abstract.items() if c != PARAMS}
        items = {"params": abstract[PARAMS], "buffers": without(buffers, _non_persistent(lay))}
        restored, _ = self._restore(step, items, shardings, lay, abstract[PARAMS])
        recomputed = self._placed_recomputed(lay, buffers, shardings, abstract[PARAMS])
        return {PARAMS: restored["params"], **merge(restored["buffers"], recomputed)}

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The `meta` item (JSON) of step `step` (default: the latest)."""
        step = self._resolve(step)
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return dict(self._manager.restore(step, args=args)["meta"])

    def _resolve(self, step: int | None) -> int:
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(_errors.NO_STEP.format(directory=self.directory))
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                _errors.NO_SUCH_STEP.format(
                    step=step, directory=self.directory, steps=self.all_steps()
                )
            )
        return step

    def _placed_recomputed(
        self, lay: Layout, buffers: Mapping[str, Any], shardings: ShardingSpec, params: Any
    ) -> dict[tuple[str, ...], jax.Array]:
        """The recomputed non-persistent buffers, on the devices their target names."""
        values = self._recomputed(lay)
        if not values:
            return {}
        name_of = functools.partial(_leaf_name, lay, params, "buffers")
        placed = abstract_with_shardings(dict(buffers), name_of, shardings)
        out = {}
        for path, value in values.items():
            target = placed
            for part in path:
                target = target[part]
            # a copy, never the cached value itself: a donating train step deletes its input
            out[path] = jax.device_put(value, target.sharding, may_alias=False)
        return out

    def _restore(
        self,
        step: int | None,
        items: Mapping[str, Any],
        shardings: ShardingSpec,
        lay: Layout,
        params: Any,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        step = self._resolve(step)
        meta = self.metadata(step)
        if meta.get("format") != FORMAT:
            raise ValueError(
                _errors.NOT_OURS.format(
                    step=step, directory=self.directory, found=meta.get("format"), expected=FORMAT
                )
            )
        empty = set(meta.get("empty_items", ()))
        for item in items:
            if item not in meta["items"] and item not in empty:
                fix = _errors.NO_OPT_STATE if item == "opt_state" else ""
                raise KeyError(
                    _errors.MISSING_ITEM.format(
                        step=step, directory=self.directory, item=item, found=meta["items"], fix=fix
                    )
                )
        order = [name for name, _ in lay.keys]
        for item, target in items.items():  # before orbax reads a byte
            name_of = functools.partial(_leaf_name, lay, params, item)
            saved = {tuple(k.split("/")): tuple(v[0]) for k, v in meta["shapes"][item].items()}
            errors = _errors.mismatch(item, target, saved, name_of, order)
            if errors:
                saved_by = f"{meta['module']} (flax_registry {meta['flax_registry_version']})"
                cls = type(self.module).__name__
                raise _errors.mismatch_error(item, step, self.directory, cls, errors, saved_by)
        args = {
            k: ocp.args.StandardRestore(
                abstract_with_shardings(
                    v,
                    functools.partial(_leaf_name, lay, params, k),
                    shardings,
                    collection=_ITEM_COLLECTION.get(k, k),
                )
            )
            for k, v in items.items()
            if k not in empty
        }
        restored = self._manager.restore(step, args=ocp.args.Composite(**args)) if args else {}
        # an item saved empty has no arrays to read: it is the target's (array-free) structure
        return {k: v if k in empty else restored[k] for k, v in items.items()}, meta


def _non_persistent(lay: Layout) -> set[tuple[str, ...]]:
    """`(collection, *path)` of every non-persistent buffer."""
    return {(c, *p) for (c, p), info in lay.table.items() if not info.persistent}


def _leaf_name(
    lay: Layout, params: Any, item: str, path: tuple[str, ...], shape: tuple[int, ...]
) -> str:
    """The PyTorch name of a leaf of an item; an optimizer-state leaf is named after its
    parameter (the longest suffix of its path that is a parameter of the same shape)."""
    if item in ("params", "buffers"):
        ident = (PARAMS, path) if item == "params" else (path[0], path[1:])
        info = lay.table.get(ident)
        return info.name if info is not None else "/".join((ident[0], *ident[1]))
    for k in range(len(path), 0, -1):
        info = lay.table.get((PARAMS, path[-k:]))
        if info is not None and _shape_at(params, info.path) == tuple(shape):
            return info.name
    return "opt_state." + ".".join(path)


def _shape_at(tree: Any, path: tuple[str, ...]) -> tuple[int, ...] | None:
    for part in path:
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tuple(np.shape(tree))


def _shapes(tree: Any) -> dict[str, list[Any]]:
    """`{"a/b/c": [shape, dtype]}` of every leaf: the strictness checks of a restore read
    these from the small `meta` item instead of the arrays' metadata."""
    return {"/".join(p): [list(np.shape(v)), str(v.dtype)] for p, v in leaf_paths(tree).items()}


def _version() -> str:
    return __version__


def _is_train_state(state: Any) -> TypeGuard[TrainState]:
    """A `flax_registry.train.TrainState` (read by its fields: checkpoints do not import the
    training package)."""
    return all(hasattr(state, f) for f in ("params", "buffers", "opt_state", "step", "rng"))
