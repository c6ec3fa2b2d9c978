"""Hand-assembled torch checkpoints for the malformed-file tests: pickle opcodes as bytes, and
zip archives laid out like torch.save's (one folder, data.pkl, byteorder, data/<key>, version).
"""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

PROTO = b"\x80\x02"
MARK, TUPLE, TUPLE1, TUPLE2, REDUCE, BUILD = b"(", b"t", b"\x85", b"\x86", b"R", b"b"
EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE = b"}", b"]", b")"
SETITEM, SETITEMS, APPENDS, STOP, BINPERSID, NEWFALSE = b"s", b"u", b"e", b".", b"Q", b"\x89"


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def uni(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def integer(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    raw = pickle.encode_long(n)
    return b"\x8a" + bytes([len(raw)]) + raw


def put(i: int) -> bytes:
    return b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)


def get(i: int) -> bytes:
    return b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)


def tup(items: list[int] | tuple[int, ...]) -> bytes:
    return MARK + b"".join(integer(x) for x in items) + TUPLE


def pid(key: str, storage: str = "FloatStorage", numel: int = 4) -> bytes:
    """A persistent storage reference, as torch.save writes it."""
    return (
        MARK
        + uni("storage")
        + glob("torch", storage)
        + uni(key)
        + uni("cpu")
        + integer(numel)
        + TUPLE
        + BINPERSID
    )


def tensor(
    key: str = "0",
    storage: str = "FloatStorage",
    numel: int = 4,
    size: bytes | None = None,
    stride: bytes | None = None,
    offset: int = 0,
    storage_ref: bytes | None = None,
) -> bytes:
    """``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""
    return (
        glob("torch._utils", "_rebuild_tensor_v2")
        + MARK
        + (storage_ref if storage_ref is not None else pid(key, storage, numel))
        + integer(offset)
        + (size if size is not None else tup((numel,)))
        + (stride if stride is not None else tup((1,)))
        + NEWFALSE
        + glob("collections", "OrderedDict")
        + EMPTY_TUPLE
        + REDUCE
        + TUPLE
        + REDUCE
    )


def state_dict(items: dict[str, bytes]) -> bytes:
    """A pickle of ``{name: <object built by its opcodes>}``."""
    body = b"".join(uni(k) + v for k, v in items.items())
    return PROTO + EMPTY_DICT + MARK + body + SETITEMS + STOP


def torch_zip(
    path: Path,
    pickle_bytes: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    extra: list[tuple[str, bytes]] | None = None,
) -> Path:
    """A zip laid out as torch.save lays it out, holding ``pickle_bytes`` as data.pkl."""
    root = "archive"
    entries = [(f"{root}/data.pkl", pickle_bytes), (f"{root}/byteorder", b"little")]
    entries += [(f"{root}/data/{k}", v) for k, v in (storages or {}).items()]
    entries += [(f"{root}/version", b"3\n")] + (extra or [])
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicated names are wanted in some tests
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
            for name, content in entries:
                z.writestr(name, content)
    path.write_bytes(out.getvalue())
    return path


def central_entries(raw: bytes) -> list[int]:
    """Offsets of the central-directory records of a zip held in ``raw``."""
    (cd_size, cd_offset) = struct.unpack_from("<LL", raw, raw.rfind(b"PK\x05\x06") + 12)
    out, at = [], cd_offset
    while at < cd_offset + cd_size:
        out.append(at)
        n, m, k = struct.unpack_from("<HHH", raw, at + 28)
        at += 46 + n + m + k
    return out


def central_name(raw: bytes, at: int) -> bytes:
    (n,) = struct.unpack_from("<H", raw, at + 28)
    return raw[at + 46 : at + 46 + n]
