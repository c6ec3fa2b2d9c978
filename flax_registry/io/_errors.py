"""Errors raised by the checkpoint-file layer, and the long messages they carry.

Every message names the file, what was expected, what was found, and the fix.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable
from os import PathLike


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupted, mislabelled, or holds something unexpected.

    Unlike ``torch.load`` (which surfaces ``RuntimeError``/``UnpicklingError``/``BadZipFile``
    depending on where parsing failed) and ``safetensors`` (``SafetensorError``), every problem
    with a checkpoint file is reported as this one type, with the file path in the message.
    """


class ForbiddenGlobalError(CheckpointError):
    """A pickled PyTorch checkpoint referenced a Python global outside the tensor allowlist.

    The unpickler stopped before calling anything: nothing from the file was executed.
    ``torch.load(weights_only=True)`` raises ``UnpicklingError`` for the same case.
    """

    def __init__(self, message: str, *, global_name: str) -> None:
        super().__init__(message)
        self.global_name = global_name


# -- generic -------------------------------------------------------------------------------------

NOT_FOUND = (
    "{path}: no such file or directory. Expected a checkpoint file or a directory holding one."
)
EMPTY_FILE = (
    "{path}: the file is empty (0 bytes). Expected a safetensors file or a PyTorch checkpoint. "
    "Fix: re-download or re-save the checkpoint."
)
UNKNOWN_FORMAT = (
    "{path}: unrecognised checkpoint format (the file starts with {head!r}). Expected a "
    "safetensors file (8-byte little-endian header length, then a JSON header), a PyTorch zip "
    "checkpoint written by torch.save (starts with b'PK\\x03\\x04'), or a *.index.json file. "
    "Fix: check that the path points at the weights file itself."
)
LFS_POINTER = (
    "{path}: this is a Git LFS pointer file, not the checkpoint itself. "
    "Fix: run `git lfs pull` in the repository (or download the file directly)."
)
HTML_PAGE = (
    "{path}: this is an HTML page, not a checkpoint (the download probably returned an error or "
    "login page). Fix: download the file again, with authentication if the repository needs it."
)
LEGACY_TORCH = (
    "{path}: this is a legacy (pre-1.6, non-zip) PyTorch pickle, written by "
    "torch.save(..., _use_new_zipfile_serialization=False). Expected the zip format that "
    "torch.save writes by default. The legacy format is not supported because it cannot be "
    "read lazily or validated before unpickling. Fix: in a trusted environment run "
    "`torch.save(torch.load(path, weights_only=True), new_path)` (default zip format), or "
    "convert it to safetensors with `safetensors.torch.save_file`."
)
ENTRY_NOT_APPLICABLE = (
    "{path}: entry={entry!r} was given, but this is a {kind}, which holds one flat mapping of "
    "tensors. entry= selects a nested state dict inside a single torch.save checkpoint. "
    "Fix: drop the entry argument."
)
DIR_NO_CHECKPOINT = (
    "{path}: the directory holds no checkpoint file. Expected one of {expected}, or a single "
    "*.safetensors / *.safetensors.index.json / *.bin / *.pt / *.pth file. "
    "Fix: pass the path of the weights file."
)
DIR_AMBIGUOUS = (
    "{path}: the directory holds several candidate checkpoint files ({found}) and none of the "
    "standard names {expected}. Fix: pass the path of the file you want."
)

# -- safetensors -----------------------------------------------------------------------------------

ST_TOO_SMALL = (
    "{path}: the file has {size} bytes, fewer than the 8-byte header length a safetensors file "
    "starts with: the file is truncated (an interrupted download?). Fix: download it again."
)
ST_HEADER_TOO_LARGE = (
    "{path}: the safetensors header length is {n} bytes, which is larger than the file "
    "({size} bytes): the file is truncated or is not a safetensors file. "
    "Fix: download it again, or check the file type."
)
ST_HEADER_LIMIT = (
    "{path}: the safetensors header length is {n} bytes, more than the {limit}-byte limit the "
    "safetensors format allows: the file is corrupted or not a safetensors file."
)
ST_BAD_JSON = (
    "{path}: the safetensors header is not valid JSON ({error}). Expected a JSON object mapping "
    "tensor names to {{dtype, shape, data_offsets}}. The file is corrupted: download it again."
)
ST_BAD_ENTRY = (
    "{path}: the safetensors header entry for {key!r} is invalid: {problem}. Expected "
    '{{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}} with '
    "end - begin == prod(shape) * itemsize. The file is corrupted: download it again."
)
ST_BAD_DTYPE = (
    "{path}: tensor {key!r} has safetensors dtype {dtype!r}, which flax_registry cannot read. "
    "Supported: {supported}. Fix: convert that tensor to a supported dtype before saving."
)
ST_BAD_METADATA = (
    "{path}: the safetensors __metadata__ must map str to str, found {found}. "
    "The file was written by a non-conforming tool: re-save it with safetensors."
)
ST_BAD_LAYOUT = (
    "{path}: the safetensors header is invalid: {problem}. Expected the tensors to follow each "
    "other from the first data byte to the end of the file (safetensors refuses the file too). "
    "The file is corrupted or truncated: download it again."
)
ST_TRUNCATED = (
    "{path}: the header says {expected} bytes of tensor data but the file has {found}: the file "
    "is truncated (an interrupted download?). Fix: download it again."
)

# -- index files -----------------------------------------------------------------------------------

INDEX_BAD_JSON = (
    "{path}: the checkpoint index is not valid JSON ({error}). Expected the Hugging Face format "
    '{{"metadata": {{...}}, "weight_map": {{tensor_name: shard_filename}}}}. '
    "Fix: download the index file again."
)
INDEX_BAD_FORMAT = (
    "{path}: the checkpoint index is malformed: {problem}. Expected the Hugging Face format "
    '{{"metadata": {{...}}, "weight_map": {{tensor_name: shard_filename}}}}. '
    "Fix: download the index file again."
)
INDEX_MISSING_SHARD = (
    "{path}: the index lists shard {shard!r}, but {shard_path} does not exist. Expected every "
    "shard named in weight_map next to the index file. Fix: download the missing shard(s)."
)
INDEX_KEY_NOT_IN_SHARD = (
    "{path}: the index maps {key!r} to shard {shard!r}, but that shard has no such tensor "
    "(it holds {count} tensors). The index and the shards come from different checkpoints: "
    "download them again together."
)

# -- PyTorch zip -----------------------------------------------------------------------------------

ZIP_UNREADABLE = (
    "{path}: could not read the PyTorch checkpoint ({error}). Expected a zip archive written by "
    "torch.save. The file is corrupted or crafted: download or save it again."
)
ZIP_NOT_ZIP_START = (
    "{path}: not a valid zip archive: the file starts with {head!r}, not with a zip local "
    "header (b'PK\\x03\\x04'), so torch.load does not read it as a zip checkpoint either. "
    "Expected a PyTorch checkpoint written by torch.save. The file is corrupted or has data "
    "prepended: download or save it again."
)
ZIP_DUPLICATE = (
    "{path}: the archive holds {count} entries named {entry!r}. torch.save never writes a name "
    "twice (torch.load would read one copy, zipfile another): the file is corrupted or crafted."
)
ZIP_BAD_VERSION = (
    "{path}: archive entry {entry!r} holds {found!r}, not a format version PyTorch reads "
    "(an integer from {low} to {high}). The file is corrupted, or was written by a newer "
    "PyTorch: upgrade, or re-save it with this one."
)
ZIP_NO_VERSION = (
    "{path}: the archive has no '{prefix}/version' entry, which every torch.save archive holds "
    "(torch.load refuses it too). The file is truncated or corrupted: download or save it again."
)
ZIP_RECORD_SIZE = (
    "{path}: archive entry {entry!r}: record size ({found} bytes) does not match expected size "
    "({expected} bytes = {numel} elements * {itemsize} bytes/element) for storage {storage} "
    "(PyTorch refuses it with the same words). The file is corrupted or crafted."
)
ZIP_BAD = (
    "{path}: not a valid zip archive ({error}). Expected a PyTorch checkpoint written by "
    "torch.save (a zip archive). The file is truncated or corrupted: download or save it again."
)
ZIP_NO_PICKLE = (
    "{path}: the zip archive has no '<name>/data.pkl' entry, so it is not a PyTorch checkpoint "
    "written by torch.save. Found entries: {found}. Fix: check the file type."
)
ZIP_TORCHSCRIPT = (
    "{path}: this is a TorchScript archive (torch.jit.save), not a torch.save checkpoint. "
    "Fix: in a trusted environment run `torch.save(torch.jit.load(path).state_dict(), "
    "new_path)`, or save the state dict with safetensors."
)
ZIP_MISSING_STORAGE = (
    "{path}: data.pkl refers to storage {key!r}, but the archive has no entry {entry!r}: the "
    "file is truncated or corrupted. Fix: download or save it again."
)
ZIP_CORRUPT_ENTRY = (
    "{path}: archive entry {entry!r} is corrupted: {problem}. Fix: download or save the file again."
)
ZIP_BAD_PICKLE = (
    "{path}: could not unpickle data.pkl ({error}). Expected the pickle that torch.save writes "
    "(containers of tensors). The file is corrupted or was written by an unsupported tool."
)
ZIP_BAD_TENSOR = (
    "{path}: tensor stored in {entry!r} is invalid: {problem}. Expected its shape, strides and "
    "offset to lie inside its storage. The file is corrupted or crafted."
)
ZIP_UNSUPPORTED_DTYPE = (
    "{path}: tensor {key!r} has dtype {dtype}, which has no NumPy/ml_dtypes "
    "equivalent. Fix: convert that tensor (e.g. to float32 or uint8) before saving."
)
FORBIDDEN_GLOBAL = (
    "{path}: refusing to unpickle: data.pkl references the Python global `{name}`, which is not "
    "on the allowlist of tensor-rebuilding functions and plain containers. Nothing from the file "
    "was executed. The file may be malicious, or it holds objects other than tensors (an "
    "optimizer with custom classes, a whole nn.Module, numpy arrays). Fix: if you trust the "
    "file, load it with torch.load in a sandbox and save only its state dict with "
    "safetensors.torch.save_file; otherwise use a safetensors copy of the weights."
)
NEEDS_ENTRY = (
    "{path}: the checkpoint is a dict that is not a flat state dict; its top-level entries are: "
    "{listing}. Expected a mapping of str to tensors. Fix: pass entry=... to pick the state "
    "dict, e.g. entry={suggestion!r}."
)
NOT_A_DICT = (
    "{path}: the checkpoint holds {found}, not a dict of tensors. Expected a state dict "
    "(torch.save(model.state_dict(), path)). Fix: re-save the state dict."
)
BAD_ENTRY_PATH = (
    "{path}: entry={entry!r} not found: {problem}. Available at that level: {listing}. "
    "Fix: pass one of these (nested levels joined with '.')."
)
NON_TENSOR_VALUE = (
    "{path}: the state dict{where} maps {key!r} to {found}, not a tensor. Expected every value "
    "to be a tensor. Fix: pick a sub-dict with entry=..., or re-save only the tensors."
)
NON_STR_KEY = (
    "{path}: the state dict{where} has a non-string key {key}. Expected str keys like "
    "'layer.weight'. Fix: re-save the state dict with string keys."
)

# -- tensor layouts (both formats) ------------------------------------------------------------

BAD_LAYOUT = (
    "{path}: tensor {key!r} cannot be read: {problem}. The file is corrupted or crafted: "
    "download or save it again."
)

# -- reader ----------------------------------------------------------------------------------------

MISSING_KEY = "{key!r} is not in checkpoint {path} ({count} tensors).{hint}"
CLOSED = "{path}: the checkpoint reader is closed. Fix: read tensors inside the `with` block."


def missing_key_message(key: object, path: str | PathLike[str], keys: Iterable[str]) -> str:
    """The KeyError text for ``key``: the file, the tensor count, and up to 5 close matches."""
    keys = list(keys)
    close = difflib.get_close_matches(str(key), keys, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(repr(k) for k in close)}?" if close else ""
    return MISSING_KEY.format(key=key, path=path, count=len(keys), hint=hint)


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40
for _name in ("maxtuple", "maxlist", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_REPR, _name, 6)


def short_repr(x: object, limit: int = 200) -> str:
    """A bounded ``repr`` of data read from a file: at most 3 levels and 6 items per container,
    cut at ``limit`` characters. Costs O(1) however large, deep or shared the object is (a plain
    ``repr`` of a pickled list DAG takes exponential time and memory)."""
    text = _REPR.repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception raised while parsing a file, bounded: the message is
    built from short reprs of its arguments, never from ``str(e)`` of arbitrary objects."""
    args = e.args
    if len(args) == 1 and isinstance(args[0], str):
        text = args[0]
    elif all(isinstance(a, str | int) for a in args):
        text = str(e)
    else:
        text = ", ".join(short_repr(a, 80) for a in args[:4])
    text = " ".join(text.split())  # one line
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
