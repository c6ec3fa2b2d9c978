"""The conversion plan's data: every torch key of a model (`Entry`) and the flax variables
behind it (`Part`s, each with its `Layout`), in `state_dict` order (`Plan`). `_plan.make_plan`
builds one, `_translate` reads and `_export` writes through it.

A torch key may be one slice of a flax variable (`Part.select`): a `Stacked` rule's keys are
the slices of one array along a new axis, a `Scanned` module's layer i the slices at index i
of every variable. Several keys then fill one variable, and `Plan.stacks` / `Plan.scans`
record which, so that a checkpoint that cannot fill them is refused before any read."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .._frontend import Frontend
from .._inputs import Inputs
from ._layout import Layout


@dataclasses.dataclass(frozen=True)
class Part:
    """One flax variable behind a torch key, or with `select` one slice of it: `(axis, index)`
    pairs taken in turn (each axis counted in what the previous ones left)."""

    collection: str
    path: tuple[str, ...]  # full path inside the collection
    layout: Layout
    leaf: Any  # the target leaf (the whole variable): jax.ShapeDtypeStruct or an array
    select: tuple[tuple[int, int], ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape the layout maps: the variable's, less the selected axes."""
        shape = list(self.leaf.shape)
        for axis, _ in self.select:
            del shape[axis]
        return tuple(shape)

    @property
    def variable_shape(self) -> tuple[int, ...]:
        return tuple(self.leaf.shape)

    def fixed(self) -> dict[int, int]:
        """The selection as `{axis of the whole variable: index}`."""
        free = list(range(len(self.leaf.shape)))
        out = {}
        for axis, index in self.select:
            out[free.pop(axis)] = index
        return out

    def take(self, array: Any) -> Any:
        """This part's slice of the whole variable `array` (a view)."""
        if not self.select:
            return array
        index: list[Any] = [slice(None)] * len(self.leaf.shape)
        for axis, i in self.fixed().items():
            index[axis] = i
        return array[tuple(index)]

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return self.layout.torch_shape(self.shape)

    @property
    def where(self) -> str:
        return "/".join((self.collection, *self.path))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One torch tensor: the concatenation along torch axis `axis` of its parts. `layer` is
    the type of the layer it comes from; `raw` marks a variable of a layer without a rule,
    mapped unchanged."""

    key: str
    parts: tuple[Part, ...]
    axis: int = 0
    layer: str = ""
    raw: bool = False
    added_in: int | None = None  # a buffer added in this module `_version` (see Module)
    rule: str = ""  # the rule entry it comes from, for messages

    @property
    def torch_shape(self) -> tuple[int, ...]:
        shapes = [p.torch_shape for p in self.parts]
        if len(shapes) == 1:
            return shapes[0]
        total = sum(s[self.axis] for s in shapes)
        return (*shapes[0][: self.axis], total, *shapes[0][self.axis + 1 :])


@dataclasses.dataclass(frozen=True)
class StackGroup:
    """The keys of one `Stacked` rule entry at one layer: slices of one flax variable."""

    rule: str  # the entry, described
    where: str  # the layer's torch name
    variable: str  # collection/path of the flax variable
    keys: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ScanGroup:
    """The layers of one `Scanned` module: `layers[i]` are the torch keys of layer i."""

    rule: str
    prefix: str  # the scanned module's torch name
    template: str  # layer i's name below it, with `{i}`
    layers: tuple[tuple[str, ...], ...]

    def name(self, i: int | str) -> str:
        sub = self.template.replace("{i}", str(i))
        return f"{self.prefix}.{sub}" if self.prefix else sub


@dataclasses.dataclass
class Plan:
    """Every torch key of a model, in `state_dict` order."""

    cls: str
    target: dict[str, Any]  # the variables tree the plan was made from
    entries: dict[str, Entry] = dataclasses.field(default_factory=dict)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)  # alias -> canonical key
    extras: dict[str, tuple[np.ndarray, str]] = dataclasses.field(default_factory=dict)
    order: list[str] = dataclasses.field(default_factory=list)
    nonpersistent: dict[str, tuple[str, tuple[str, ...]]] = dataclasses.field(default_factory=dict)
    frontend: Frontend | None = dataclasses.field(default=None, repr=False)
    inputs: Inputs | None = None
    stacks: list[StackGroup] = dataclasses.field(default_factory=list)
    scans: list[ScanGroup] = dataclasses.field(default_factory=list)
    _owners: dict[tuple[Any, ...], str] = dataclasses.field(default_factory=dict)

    def add(
        self,
        key: str,
        parts: tuple[Part, ...],
        axis: int = 0,
        layer: str = "",
        raw: bool = False,
        added_in: int | None = None,
        rule: str = "",
    ) -> None:
        ident = (axis, *((p.collection, p.path, p.select) for p in parts))
        if key in self.entries or key in self.aliases:
            return  # reached twice under one name (a shared module): one key
        if ident in self._owners:  # a tied parameter or a shared module: the same variables
            self.aliases[key] = self._owners[ident]
        else:
            self.entries[key] = Entry(key, parts, axis, layer, raw, added_in, rule)
            self._owners[ident] = key
        self.order.append(key)

    def tie(self, alias: str, canonical: str) -> None:
        if canonical not in self.entries:
            raise KeyError(
                f"tied={{{alias!r}: {canonical!r}}}: {canonical!r} is not a key of {self.cls}; "
                f"its keys are {list(self.entries)[:20]}."
            )
        self.aliases[alias] = canonical
        if alias not in self.order:
            self.order.append(alias)
