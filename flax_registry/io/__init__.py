"""Checkpoint files without PyTorch: safetensors (streaming, sharded) and torch.save zip archives.

``open_checkpoint(path)`` returns a lazy, read-only ``Mapping[str, LazyTensor]``; nothing is
read until a tensor is, pickled files go through an allowlist unpickler that never executes
code, and every malformed file raises :class:`CheckpointError` naming the file and the fix.
``save_safetensors`` writes one tensor at a time, atomically, optionally sharded.
``load_torch_object(path)`` returns the whole object a ``torch.save`` file holds (a training
checkpoint's nested dicts and lists), tensors lazy. ``reader.extent(key)`` and ``read_rows``
read a tensor's rows straight from the file into memory the caller owns (``owned_empty``).
"""

from ._errors import CheckpointError as CheckpointError
from ._errors import ForbiddenGlobalError as ForbiddenGlobalError
from ._fast_read import RowChunks as RowChunks
from ._fast_read import owned_empty as owned_empty
from ._fast_read import read_rows as read_rows
from ._lazy import LazyTensor as LazyTensor
from ._mapped import Extent as Extent
from ._reader import CheckpointReader as CheckpointReader
from ._reader import open_checkpoint as open_checkpoint
from ._save import parse_size as parse_size
from ._save import save_safetensors as save_safetensors
from ._torch_object import TorchObject as TorchObject
from ._torch_object import load_torch_object as load_torch_object

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "Extent",
    "ForbiddenGlobalError",
    "LazyTensor",
    "RowChunks",
    "TorchObject",
    "load_torch_object",
    "open_checkpoint",
    "owned_empty",
    "parse_size",
    "read_rows",
    "save_safetensors",
]
