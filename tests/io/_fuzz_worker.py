"""Fuzz worker (run by tests/io/test_fuzz.py in a subprocess): mutates real torch.save and
safetensors files with hypothesis (derandomized, so every run draws the same examples) and
checks each mutant against torch / safetensors themselves.

For every mutant: flax_registry either returns exactly what torch.load(weights_only=True,
map_location="cpu") or safetensors.torch.load_file return (same keys in the same order, same
dtypes, shapes and bytes), or raises CheckpointError naming the file; it never returns data
where the reference refuses the file, and never raises anything else. The CLI then exits 2 with
one line naming the file (refused) or 0 (read). A hang (faulthandler timer), a crash (signal)
or a memory blow-up (RLIMIT_AS, peak RSS) ends the process with a non-zero status and the
case on stderr.

usage: python _fuzz_worker.py WORKDIR EXAMPLES_PER_FORMAT [torch|safetensors]  (default: both)
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import random
import resource
import struct
import sys
import time
import warnings
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from flax_registry import cli
from flax_registry.io import CheckpointError, open_checkpoint, save_safetensors

HANG_SECONDS = 20
OPCODES = b"c\x81Rbaesu(t\x85\x86\x87N\x89\x88)]}\x8fJKMGXUQhjqr\x8a\x80.\x8c\x94\x95\x93I(0"
INTERESTING = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63, 2**64 - 1]


# -- seeds ---------------------------------------------------------------------------------------


def _torch_seeds(directory: Path) -> list[bytes]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 2), torch.nn.BatchNorm2d(3), torch.nn.Flatten(), torch.nn.Linear(3, 2)
    )
    model.train()
    model(torch.randn(2, 2, 2, 2))
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    mixed = {
        "w": torch.randn(2, 3),
        "t": base.t(),
        "row": base[1],
        "cols": base[:, 1::2],
        "bf16": torch.randn(4).to(torch.bfloat16),
        "half": torch.randn(3).half(),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "flag": torch.tensor([True, False]),
        "u16": torch.tensor([1, 2, 300], dtype=torch.int32).to(torch.uint16),
        "f8": torch.randn(2).to(torch.float8_e4m3fn),
        "c": torch.randn(2, dtype=torch.complex64),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 2),
        "steps": torch.tensor(7),
    }
    params = {"p": torch.nn.Parameter(torch.ones(2)), "q": torch.ones(1, 1)}
    seeds = []
    for i, sd in enumerate([model.state_dict(), mixed, params]):
        torch.save(sd, directory / f"seed{i}.pt")
        seeds.append((directory / f"seed{i}.pt").read_bytes())
    return seeds


def _safetensors_seeds(directory: Path) -> list[bytes]:
    tensors = {
        "a.weight": torch.randn(3, 2),
        "a.bias": torch.arange(3, dtype=torch.int64),
        "b": torch.randn(4).to(torch.bfloat16),
        "m": torch.tensor([True, False, True]),
        "s": torch.tensor(2.0),
        "e": torch.zeros(0, 3, dtype=torch.float16),
    }
    save_file(tensors, str(directory / "st0.safetensors"), metadata={"format": "pt"})
    save_safetensors(
        {
            k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in tensors.items()
        },
        directory / "st1.safetensors",
    )
    return [(directory / f"st{i}.safetensors").read_bytes() for i in range(2)]


# -- mutations -----------------------------------------------------------------------------------


def _raw_mutation(data: Any, buf: bytes, lo: int = 0, hi: int | None = None) -> bytes:
    """One random edit of ``buf[lo:hi]`` (within the file)."""
    b = bytearray(buf)
    hi = len(b) if hi is None else hi
    if hi <= lo:
        return bytes(b)
    kind = data.draw(
        st.sampled_from(["flip", "byte", "int", "insert", "delete", "truncate", "dup"])
    )
    pos = data.draw(st.integers(lo, hi - 1))
    if kind == "flip":
        b[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "byte":
        b[pos] = data.draw(st.integers(0, 255))
    elif kind == "int":
        width = data.draw(st.sampled_from([1, 2, 4, 8]))
        value = data.draw(st.sampled_from(INTERESTING)) % 2 ** (8 * width)
        b[pos : pos + width] = value.to_bytes(width, "little")
    elif kind == "insert":
        b[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    elif kind == "delete":
        del b[pos : pos + data.draw(st.integers(1, 16))]
    elif kind == "truncate":
        del b[pos:]
    else:
        n = data.draw(st.integers(1, 32))
        b[pos:pos] = b[pos : pos + n]
    return bytes(b)


def _rezip(entries: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are a mutation too
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
            for name, content in entries:
                z.writestr(name, content)
    return out.getvalue()


def _mutate_torch(data: Any, seed: bytes) -> bytes:
    region = data.draw(st.sampled_from(["file", "central", "pickle", "opcode", "entry", "names"]))
    if region == "file":
        return _raw_mutation(data, seed)
    if region == "central":
        start = seed.find(b"PK\x01\x02")
        return _raw_mutation(data, seed, start, len(seed))
    with zipfile.ZipFile(io.BytesIO(seed)) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    if region == "names":  # rename one entry (to another's name, or a variant of its own)
        i = data.draw(st.integers(0, len(entries) - 1))
        j = data.draw(st.integers(0, len(entries) - 1))
        old = entries[i][0]
        name = data.draw(
            st.sampled_from(
                [entries[j][0], old.upper(), old + "\x00x", "x/" + old.split("/", 1)[-1], old + "/"]
            )
        )
        entries[i] = (name, entries[i][1])
        return _rezip(entries)
    if region == "entry":  # any record, CRC kept valid
        i = data.draw(st.integers(0, len(entries) - 1))
    else:
        i = next(k for k, (n, _) in enumerate(entries) if n.endswith("/data.pkl"))
    name, content = entries[i]
    for _ in range(data.draw(st.integers(1, 3))):
        if region == "opcode" and content:
            pos = data.draw(st.integers(0, len(content) - 1))
            op = data.draw(st.sampled_from(sorted(set(OPCODES))))
            content = content[:pos] + bytes([op]) + content[pos + 1 :]
        else:
            content = _raw_mutation(data, content)
    entries[i] = (name, content)
    return _rezip(entries)


def _st_rewrite(header: dict[str, Any], data_bytes: bytes, text: str | None = None) -> bytes:
    raw = (text if text is not None else json.dumps(header)).encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data_bytes


def _mutate_safetensors(data: Any, seed: bytes) -> bytes:
    region = data.draw(st.sampled_from(["file", "header-bytes", "header-json"]))
    (n,) = struct.unpack("<Q", seed[:8])
    if region == "file":
        return _raw_mutation(data, seed)
    if region == "header-bytes":
        return _raw_mutation(data, seed, 0, 8 + n)
    header = json.loads(seed[8 : 8 + n])
    body = seed[8 + n :]
    keys = [k for k in header if k != "__metadata__"]
    key = data.draw(st.sampled_from(keys))
    entry = header[key]
    kind = data.draw(
        st.sampled_from(["shape", "offset", "dtype", "name", "metadata", "body", "nest"])
    )
    if kind == "shape":
        dims = entry["shape"]
        values = [0, 1, 2, 3, 2**31, 2**62, 2**64 - 1, 2**70]
        if dims and data.draw(st.booleans()):
            dims[data.draw(st.integers(0, len(dims) - 1))] = data.draw(st.sampled_from(values))
        else:
            entry["shape"] = dims + [1] * data.draw(st.sampled_from([1, 64, 65]))
    elif kind == "offset":
        which = data.draw(st.integers(0, 1))
        entry["data_offsets"][which] += data.draw(st.sampled_from([-8, -4, -2, -1, 1, 2, 4, 8]))
    elif kind == "dtype":
        entry["dtype"] = data.draw(
            st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "C64", "C128", "F8_E5M2"])
        )
    elif kind == "name":
        text = json.dumps(header).replace(
            json.dumps(key),
            data.draw(
                st.sampled_from(['"\\ud800"', '"a\\udfffb"', '"\\u0000"', json.dumps(key + "x")])
            ),
            1,
        )
        return _st_rewrite(header, body, text)
    elif kind == "metadata":
        header["__metadata__"] = data.draw(st.sampled_from([None, [], 0, {"a": 1}, {"a": "b"}]))
    elif kind == "nest":
        depth = data.draw(st.sampled_from([10, 2000, 100_000]))
        text = json.dumps(header)[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
        return _st_rewrite(header, body, text)
    else:
        body = _raw_mutation(data, body) if body else body
    return _st_rewrite(header, body)


# -- comparison ----------------------------------------------------------------------------------


def _tensor_record(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    flat = torch.empty(t.numel(), dtype=t.dtype)  # a fresh, dense copy, whatever the strides
    flat.copy_(t.detach().reshape(-1))
    if flat.dtype == torch.bool:  # compare bools by value: any non-zero byte is True
        flat = flat.view(torch.uint8) != 0
    return (
        str(t.dtype).removeprefix("torch."),
        tuple(t.shape),
        flat.view(torch.uint8).numpy().tobytes(),
    )


def _reference(path: Path) -> Any:
    """``{key: record}`` as torch / safetensors read the file, or the exception's type name."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.suffix == ".safetensors":
                obj: Any = load_file(str(path))
            else:
                obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # the reference refuses: any type
        return type(e).__name__
    if type(obj) not in (dict, OrderedDict):
        return "not a state dict"
    items = list(dict.items(obj))
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in items):
        return "not a flat state dict"
    return {k: _tensor_record(v) for k, v in items}


def _ours(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    with open_checkpoint(path) as reader:
        out = {}
        for key in reader:
            arr = reader.read(key)
            out[key] = (str(arr.dtype), arr.shape, arr.tobytes())
        return out


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, err.getvalue()


STATS: Counter[str] = Counter()


def check(path: Path, blob: bytes) -> None:
    path.write_bytes(blob)
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        try:
            ours: Any = _ours(path)
        except CheckpointError as e:
            assert str(path) in str(e), f"CheckpointError does not name the file: {e}"
            ours = e
        reference = _reference(path)
        if isinstance(ours, CheckpointError):
            STATS[
                "refused" if not isinstance(reference, dict) else "refused, reference read it"
            ] += 1
            code, err = _cli(["convert", str(path), str(path.with_suffix(".out")), "--no-progress"])
            assert code == 2, f"CLI exit {code} for a refused file"
            assert err.count("\n") == 1 and str(path) in err, f"CLI message: {err!r}"
        else:
            assert isinstance(reference, dict), f"read a file the reference refuses ({reference})"
            assert list(ours) == list(reference), (list(ours), list(reference))
            for key, record in reference.items():
                assert ours[key] == record, f"{key}: {ours[key][:2]} != {record[:2]}"
            STATS["read, equal to the reference"] += 1
            code, err = _cli(["diff", str(path), str(path)])
            assert code == 0, err
    finally:
        faulthandler.cancel_dump_traceback_later()


def main() -> None:
    workdir, examples = Path(sys.argv[1]), int(sys.argv[2])
    formats = sys.argv[3:] or ["torch", "safetensors"]
    faulthandler.enable()
    torch_seeds = _torch_seeds(workdir)
    st_seeds = _safetensors_seeds(workdir)
    for i, blob in enumerate(torch_seeds):  # the unmutated seeds read exactly
        check(workdir / f"unmutated{i}.pt", blob)
    for i, blob in enumerate(st_seeds):
        check(workdir / f"unmutated{i}.safetensors", blob)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        vm_bytes = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes + (2 << 30), hard))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    explore = os.environ.get("FUZZ_SEED")  # another fixed seed, to explore beyond the suite's
    common = settings(
        max_examples=examples,
        derandomize=explore is None,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
    )

    def seeded(test: Any) -> Any:
        return test if explore is None else seed(int(explore))(test)

    @seeded
    @common
    @given(st.data())
    def fuzz_torch(data: Any) -> None:
        seed = torch_seeds[data.draw(st.integers(0, len(torch_seeds) - 1))]
        check(workdir / "case.pt", _mutate_torch(data, seed))

    @seeded
    @common
    @given(st.data())
    def fuzz_safetensors(data: Any) -> None:
        seed = st_seeds[data.draw(st.integers(0, len(st_seeds) - 1))]
        check(workdir / "case.safetensors", _mutate_safetensors(data, seed))

    fuzzers = {"torch": fuzz_torch, "safetensors": fuzz_safetensors}
    start = time.perf_counter()
    for name in formats:
        fuzzers[name]()
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline
    print(
        json.dumps(
            {
                "examples": sum(STATS.values()),
                "outcomes": dict(STATS),
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss_growth_mb": round(grown_kb / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    random.seed(0)
    main()
