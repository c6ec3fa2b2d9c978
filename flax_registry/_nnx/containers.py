"""`Sequential`, `ModuleList`, `ModuleDict` for NNX: PyTorch's containers, children named
`0`, `1`, ... (or by key), any NNX module as a child."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from flax import nnx

from .module import Module


class Sequential(Module):
    """`torch.nn.Sequential`: calls its children in order; `seq[i]`, `len(seq)`, iteration."""

    def __init__(self, *layers: nnx.Module) -> None:
        for i, layer in enumerate(layers):
            self.register_module(str(i), layer)
        self._length = len(layers)

    def __call__(self, x: Any) -> Any:
        for layer in self:
            x = layer(x)
        return x

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[Any]:
        return (getattr(self, str(i)) for i in range(self._length))

    def __getitem__(self, index: int) -> Any:
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} is out of range")
        return getattr(self, str(index % self._length))


class ModuleList(Sequential):
    """`torch.nn.ModuleList`: children `0`, `1`, ...; not callable."""

    def __init__(self, modules: Iterable[nnx.Module] = ()) -> None:
        super().__init__(*modules)

    def __call__(self, x: Any) -> Any:
        raise NotImplementedError("ModuleList is not callable: iterate over it, as in PyTorch")


class ModuleDict(Module):
    """`torch.nn.ModuleDict`: children named by their keys, in insertion order."""

    def __init__(self, modules: Mapping[str, nnx.Module] | None = None) -> None:
        keys = []
        for key, module in (modules or {}).items():
            self.register_module(key, module)
            keys.append(key)
        self._keys = tuple(keys)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)
