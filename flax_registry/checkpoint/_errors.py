"""Restore errors that name the keys: PyTorch's wording, PyTorch's dotted names."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import _messages as messages
from .._nested import leaf_paths

NO_STEP = (
    "no checkpoint to restore in {directory}: it holds no finished step. Save one first, or "
    "check the directory (an interrupted save leaves only a *.orbax-checkpoint-tmp* folder)."
)
NO_SUCH_STEP = "checkpoint step {step} does not exist in {directory} (steps: {steps})."
MISSING_ITEM = (
    "checkpoint step {step} in {directory} has no item '{item}' (it holds {found}). {fix}"
)
NO_OPT_STATE = (
    "It was saved from variables, not a TrainState: restore the parameters and buffers with "
    "restore_variables(), then create a new train state."
)
NOT_OURS = (
    "checkpoint step {step} in {directory} is not a flax_registry checkpoint (meta format "
    "{found!r}, expected {expected!r}); read it with orbax.checkpoint directly."
)
RNG_IMPL = (
    "the train state of checkpoint step {step} has a '{saved}' random key, the target a "
    "'{target}' one: create the target with create_train_state(..., rng=jax.random.key(0, "
    "impl='{saved}'))."
)
_MISMATCH = (
    "Error(s) in restoring item '{item}' of checkpoint step {step} ({directory}) into "
    "{cls}:\n\t{errors}\nThe checkpoint was written by {saved}. Restore into the model it was "
    "saved from, or load what matches with flax_registry.load_state_dict(strict=False)."
)


def mismatch(
    item: str,
    target: Any,
    on_disk: Mapping[tuple[str, ...], tuple[int, ...]],
    name_of: Callable[[tuple[str, ...], tuple[int, ...]], str],
    order: Sequence[str] = (),
) -> list[str]:
    """Missing keys, unexpected keys and size mismatches between an abstract target and the
    shapes saved in the checkpoint (`{path: shape}`), worded as PyTorch's `load_state_dict` words them (missing
    keys in `order`, the `state_dict` order)."""
    theirs = on_disk
    ours = {p: tuple(leaf.shape) for p, leaf in leaf_paths(target).items()}
    rank = {name: i for i, name in enumerate(order)}
    missing = sorted(
        (name_of(p, s) for p, s in ours.items() if p not in theirs),
        key=lambda n: rank.get(n, len(rank)),
    )
    unexpected = [f"{item}/" + "/".join(p) for p in theirs if p not in ours]
    errors = [
        messages.size_mismatch(name_of(p, s), theirs[p], s)
        for p, s in ours.items()
        if p in theirs and theirs[p] != s
    ]
    if unexpected:
        errors.insert(0, messages.unexpected_keys(unexpected, "checkpoint"))
    if missing:
        errors.insert(0, messages.missing_keys(missing, "checkpoint"))
    return errors


def mismatch_error(
    item: str, step: int, directory: Any, cls: str, errors: list[str], saved: str
) -> ValueError:
    return ValueError(
        _MISMATCH.format(
            item=item,
            step=step,
            directory=directory,
            cls=cls,
            errors="\n\t".join(errors),
            saved=saved,
        )
    )
