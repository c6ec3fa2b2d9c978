"""`LoadReport`: everything a conversion did not copy one-to-one, each listed by key.

PyTorch's `load_state_dict` returns only `missing_keys` / `unexpected_keys`; a conversion also
renames, casts, drops and ties keys, and a report that lists each of them is the difference
between a checked conversion and a silent one. The report also carries what `to_torch` needs
to write the checkpoint back exactly as it came (original names, dtypes, order and the values
of torch-only keys such as `num_batches_tracked`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import _messages as messages
from ..state import IncompatibleKeys
from ._suggest import suggest

_HINT_RENAMES = (
    "Hint: missing and unexpected keys together usually mean different names: pass "
    "renames={{r'^<checkpoint prefix>': '<model prefix>'}} (e.g. {{r'^module\\.': ''}} for "
    "DataParallel). The model's first keys are {model_keys}; the checkpoint's are {source_keys}."
)


@dataclasses.dataclass
class LoadReport:
    """What `from_torch` did besides copying a tensor to the variable of the same name.

    - `missing_keys`: model keys the checkpoint lacks (an alias present counts as present);
    - `unexpected_keys`: checkpoint keys (after renames) the model has no place for (the
      names of PyTorch's `_IncompatibleKeys`, also as `incompatible_keys`; `missing` and
      `unexpected` are the same lists);
    - `shape_mismatches`: `(key, checkpoint shape, model shape)` in torch layout;
    - `casts`: `(key, checkpoint dtype, loaded dtype)` for every tensor whose dtype changed;
    - `tied_aliases`: `(alias, key)` pairs that are one variable (checked equal when both are
      in the checkpoint);
    - `skipped_nonpersistent`: non-persistent buffers (never in a state_dict; the module
      recomputes them);
    - `renamed`: `(checkpoint key, model key)` for every key `renames` changed;
    - `dropped`: `(key, reason)` for checkpoint keys deliberately not loaded
      (`num_batches_tracked`: flax BatchNorm has no counter);
    - `initialized`: model keys freshly initialised from the model's initializers (`init=`);
    - `defaulted`: buffers a PyTorch module added in a later version (`num_batches_tracked`)
      that the state dict lacks, as PyTorch allows without version metadata: they keep their
      current value (0 for abstract variables);
    - `checkpoint_aliases`: checkpoint keys the model has no place for that the checkpoint
      stores as the very same tensor as a key that loads (`torch.save` keeps tied weights
      as one storage), each with that key; also in `tied_aliases`.

    `extras` (dropped values), `source_order` and `source_dtypes` let
    `to_torch(..., report=report)` restore the checkpoint's names, dtypes and order.
    """

    cls: str = ""
    missing_keys: list[str] = dataclasses.field(default_factory=list)
    unexpected_keys: list[str] = dataclasses.field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
        default_factory=list
    )
    casts: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    tied_aliases: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped_nonpersistent: list[str] = dataclasses.field(default_factory=list)
    renamed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    dropped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    checkpoint_aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    initialized: list[str] = dataclasses.field(default_factory=list)
    defaulted: list[str] = dataclasses.field(default_factory=list)
    hints: list[str] = dataclasses.field(default_factory=list, repr=False)
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict, repr=False)
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    source_order: list[str] = dataclasses.field(default_factory=list, repr=False)
    source_dtypes: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def missing(self) -> list[str]:
        return self.missing_keys

    @property
    def unexpected(self) -> list[str]:
        return self.unexpected_keys

    @property
    def incompatible_keys(self) -> IncompatibleKeys:
        """What PyTorch's `load_state_dict` would return: `(missing_keys, unexpected_keys)`."""
        return IncompatibleKeys(list(self.missing_keys), list(self.unexpected_keys))

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unexpected or mismatched (casts, ties and drops are
        listed but not errors)."""
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def error_lines(self) -> list[str]:
        """PyTorch's `load_state_dict` error lines, in its order."""
        lines = []
        if self.missing:
            lines.append(messages.missing_keys(self.missing))
        if self.unexpected:
            lines.append(messages.unexpected_keys(self.unexpected))
        for key, theirs, ours in self.shape_mismatches:
            lines.append(messages.size_mismatch(key, theirs, ours))
        return lines

    def error(self, model_keys: list[str] | None = None) -> RuntimeError:
        """The `RuntimeError` a strict load raises, in PyTorch's format, followed by the
        closest checkpoint key for each missing key and the `renames=` that would fix them."""
        lines = self.error_lines()
        if self.missing and self.unexpected:
            unexpected = set(self.unexpected)
            matched = [k for k in self.source_order if k not in unexpected]
            suggestions = suggest(self.missing, self.unexpected, self.shapes, matched)
            if suggestions:
                lines.extend(suggestions)
            elif model_keys is not None:
                lines.append(
                    _HINT_RENAMES.format(
                        model_keys=messages.quoted(model_keys[:3]),
                        source_keys=messages.quoted(self.unexpected[:3]),
                    )
                )
        lines.extend(dict.fromkeys(self.hints))
        return messages.load_error(self.cls, lines)

    def __str__(self) -> str:
        sections = [
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            (
                "shape mismatches",
                [f"{k}: checkpoint {a}, model {b}" for k, a, b in self.shape_mismatches],
            ),
            ("casts", [f"{k}: {a} -> {b}" for k, a, b in self.casts]),
            ("tied aliases", [f"{a} = {b}" for a, b in self.tied_aliases]),
            ("freshly initialised (init=)", self.initialized),
            ("kept their current value (added in a later torch version)", self.defaulted),
            ("skipped non-persistent buffers", self.skipped_nonpersistent),
            ("renamed", [f"{a} -> {b}" for a, b in self.renamed]),
            ("dropped", [f"{k} ({why})" for k, why in self.dropped]),
        ]
        head = f"LoadReport for {self.cls}: " + (
            "all keys matched" if self.ok else "INCOMPLETE (see missing/unexpected/mismatches)"
        )
        lines = [head]
        for title, items in sections:
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        return "\n".join(lines)
