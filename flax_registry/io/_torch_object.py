"""The whole object a ``torch.save`` zip file holds, without torch: ``load_torch_object``.

``open_checkpoint`` reads one flat state dict; a training checkpoint is more: ``{"model": ...,
"optimizer": {"state": {0: {...}}, "param_groups": [...]}, "scheduler": {...}, "epoch": 3,
"rng_state": <uint8 tensor>}``. ``load_torch_object`` returns that object as it was saved
(dicts, lists, tuples, numbers, strings, None), with every tensor a :class:`LazyTensor` that
is read only when asked (``np.asarray(t)``), while the returned :class:`TorchObject` is open.

The archive is read, checked and unpickled exactly as ``open_checkpoint`` reads one
(``TorchZipFile``, the same allow-list, which includes the plain-data globals training
checkpoints hold); anything else (``numpy`` arrays, ``argparse.Namespace``) raises
:class:`ForbiddenGlobalError` before anything runs, as ``torch.load`` does by default.
"""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ._errors import CLOSED, LEGACY_TORCH, NOT_FOUND, CheckpointError
from ._lazy import LazyTensor
from ._torch_zip import TorchZipFile
from ._unpickler import StoredTensor


class TorchObject:
    """An open ``torch.save`` file: ``obj`` is what was saved, tensors as ``LazyTensor``s.

    Tensors stay readable until :meth:`close` (or the end of a ``with`` block); arrays read
    from them stay valid after. Each tensor's key is its place in ``obj``
    (``"optimizer.state.0.exp_avg"``), for messages.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._closed = False
        self._keys: set[str] = set()
        self._file = TorchZipFile(path, whole=self._wrap_all)
        self.obj = self._file.obj

    def _wrap_all(self, raw: Any, register: Callable[[str, StoredTensor], None]) -> Any:
        return self._wrap(raw, "", register)

    def _wrap(self, x: Any, where: str, register: Callable[[str, StoredTensor], None]) -> Any:
        """`x` with every StoredTensor replaced by a LazyTensor keyed by its place."""
        if isinstance(x, StoredTensor):
            key = where or "<top level>"
            while key in self._keys:  # the same tensor object saved twice
                key += "'"
            register(key, x)
            self._keys.add(key)
            return LazyTensor(self, key, x.shape, x.dtype or np.dtype(np.uint8))
        if isinstance(x, dict):  # OrderedDict and Counter keep their type
            out = type(x)() if type(x) is not dict else {}
            for k, v in x.items():
                out[k] = self._wrap(v, f"{where}.{k}" if where else str(k), register)
            return out
        if isinstance(x, list):
            return [self._wrap(v, f"{where}.{i}", register) for i, v in enumerate(x)]
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return tuple(self._wrap(v, f"{where}.{i}", register) for i, v in enumerate(x))
        return x

    def read(self, key: str) -> np.ndarray:
        """The tensor at `key` as a fresh NumPy array (its storage's CRC-32 is checked)."""
        if self._closed:
            raise CheckpointError(CLOSED.format(path=self.path))
        return self._file.read(key)

    def read_slice(self, key: str, index: Any) -> np.ndarray:
        if self._closed:
            raise CheckpointError(CLOSED.format(path=self.path))
        return self._file.read_slice(key, index)

    @property
    def num_tensors(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        """Close the file; LazyTensors of `obj` can no longer be read (arrays stay valid)."""
        self._closed = True
        self._file.close()

    def __enter__(self) -> TorchObject:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._keys)} tensors"
        return f"TorchObject({str(self.path)!r}, {state})"


def load_torch_object(path: str | PathLike[str]) -> TorchObject:
    """Open a ``torch.save`` zip file and unpickle the whole object it holds, without torch.

    Differs from ``torch.load(path, weights_only=True)``: no torch needed and tensors are
    :class:`LazyTensor`s (NumPy on read, bfloat16/float8 as ``ml_dtypes``) instead of tensors;
    the allowlist is the one above (no ``torch.device``, sparse, quantized or subclassed
    tensors). Use it as a context manager: tensors are readable while it is open.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(NOT_FOUND.format(path=p))
    with open(p, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":
        raise CheckpointError(LEGACY_TORCH.format(path=p))
    return TorchObject(p)
