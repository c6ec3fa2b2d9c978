"""`flax-registry`: inspect, convert and compare checkpoints from the command line, without torch.

    flax-registry inspect PATH                 keys, shapes, dtypes, sizes and totals
    flax-registry convert SRC DST [--to orbax] format conversion, keys unchanged
    flax-registry diff A B                     keys on one side only, shape/dtype differences,
                                               largest absolute difference per key

PATH/SRC/A/B: anything `flax_registry.io.open_checkpoint` reads (`.safetensors`, sharded
`*.index.json`, `torch.save` zip `.pt/.pth/.bin`, or a directory). Tensors are read one at a
time; nothing in a pickled file is executed.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import CheckpointError, CheckpointReader, open_checkpoint, parse_size, save_safetensors

_CHUNK_BYTES = 64 << 20  # diff compares tensors in row blocks of about this size
_PROGRESS_BYTES = 64 << 20  # a progress bar for conversions larger than this


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _table(rows: list[Sequence[str]], out: Any) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


# --- inspect ---------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace, out: Any) -> int:
    with open_checkpoint(args.path, entry=args.entry) as reader:
        rows: list[Sequence[str]] = [("key", "shape", "dtype", "size")]
        total_elems = total_bytes = 0
        for i, key in enumerate(reader):
            shape, dtype = reader.shape(key), reader.dtype(key)
            nbytes = reader.nbytes(key)
            total_elems += math.prod(shape)
            total_bytes += nbytes
            if args.limit is None or i < args.limit:
                rows.append((key, str(tuple(shape)), str(dtype), _human(nbytes)))
        print(f"{reader.path} ({reader.format}, {len(reader)} tensors)", file=out)
        _table(rows, out)
        if args.limit is not None and len(reader) > args.limit:
            print(f"... {len(reader) - args.limit} more", file=out)
        print(
            f"total: {len(reader)} tensors, {total_elems:,} elements, {_human(total_bytes)}",
            file=out,
        )
        for k, v in reader.metadata.items():
            print(f"metadata {k}: {v}", file=out)
    return 0


# --- convert ---------------------------------------------------------------------------------


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        show = enabled and total >= _PROGRESS_BYTES
        self.bar = tqdm(total=total, unit="B", unit_scale=True, disable=None if show else True)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _Tensor:
    """A tensor of the source, read (and cast) when the writer asks for its data."""

    def __init__(
        self, reader: CheckpointReader, key: str, dtype: np.dtype, progress: _Progress
    ) -> None:
        self.reader, self.key, self.progress = reader, key, progress
        self.shape = reader.shape(key)
        self.dtype = dtype

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.reader.read(self.key)
        if array.dtype != self.dtype:
            array = array.astype(self.dtype)
        self.progress.update(array.nbytes)
        return array


def _cast_dtype(stored: np.dtype, wanted: np.dtype | None) -> np.dtype:
    import jax.numpy as jnp

    if wanted is None or not jnp.issubdtype(stored, jnp.floating):
        return stored
    return wanted


def _convert(args: argparse.Namespace, out: Any) -> int:
    wanted = None
    if args.dtype is not None:
        import jax.numpy as jnp

        wanted = np.dtype(getattr(jnp, args.dtype))
    with open_checkpoint(args.src, entry=args.entry) as reader:
        dtypes = {k: _cast_dtype(reader.dtype(k), wanted) for k in reader}
        total = sum(math.prod(reader.shape(k)) * dtypes[k].itemsize for k in reader)
        progress = _Progress(total, not args.no_progress)
        tensors = {k: _Tensor(reader, k, dtypes[k], progress) for k in reader}
        try:
            if args.to == "orbax":
                written = _to_orbax(tensors, Path(args.dst))
            else:
                size = None if args.max_shard_size is None else parse_size(args.max_shard_size)
                written = save_safetensors(
                    tensors, args.dst, metadata=reader.metadata or None, max_shard_size=size
                )
        finally:
            progress.close()
    print(
        f"wrote {len(tensors)} tensors ({_human(total)}) to {', '.join(map(str, written))}",
        file=out,
    )
    return 0


def _to_orbax(tensors: Mapping[str, _Tensor], path: Path) -> list[Path]:
    """An orbax checkpoint of the flat `{torch key: array}` dict (keys unchanged). Orbax takes
    the whole tree at once, so this holds the converted checkpoint in memory (never the
    source besides)."""
    import orbax.checkpoint as ocp

    if path.exists():
        raise CheckpointError(
            f"{path}: already exists. orbax writes a new checkpoint directory; choose another "
            "destination or remove it."
        )
    tree = {k: np.asarray(t) for k, t in tensors.items()}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path.absolute(), tree)
        checkpointer.wait_until_finished()
    return [path]


# --- diff ------------------------------------------------------------------------------------


def _blocks(reader: CheckpointReader, key: str, rows: int) -> Iterator[np.ndarray]:
    shape = reader.shape(key)
    if not shape:
        yield reader.read(key)
        return
    for start in range(0, shape[0], rows):
        yield reader.read_slice(key, (slice(start, min(start + rows, shape[0])),))


def _max_abs_diff(a: CheckpointReader, b: CheckpointReader, key: str) -> float:
    """The largest |a - b| (in float64), reading both tensors in row blocks of ~64 MB."""
    shape = a.shape(key)
    row_bytes = math.prod(shape[1:]) * 8 if shape else 8
    rows = max(1, _CHUNK_BYTES // max(1, row_bytes))
    worst = 0.0
    for x, y in zip(_blocks(a, key, rows), _blocks(b, key, rows)):
        xf, yf = x.astype(np.float64), y.astype(np.float64)
        nan_x, nan_y = np.isnan(xf), np.isnan(yf)
        if (nan_x != nan_y).any():
            return math.inf  # NaN on one side only
        d = np.where((xf == yf) | nan_x, 0.0, np.abs(xf - yf))
        if d.size:
            worst = max(worst, float(d.max()))
    return worst


def _diff(args: argparse.Namespace, out: Any) -> int:
    with open_checkpoint(args.a) as a, open_checkpoint(args.b) as b:
        only_a = [k for k in a if k not in b]
        only_b = [k for k in b if k not in a]
        rows: list[Sequence[str]] = [("key", "A", "B", "max |A-B|")]
        differs = bool(only_a or only_b)
        for key in (k for k in a if k in b):
            sa, sb = a.shape(key), b.shape(key)
            da, db = a.dtype(key), b.dtype(key)
            if sa != sb:
                rows.append((key, str(tuple(sa)), str(tuple(sb)), "shape differs"))
                differs = True
                continue
            worst = _max_abs_diff(a, b, key)
            same = worst == 0.0 and da == db
            differs |= not same
            if not same or args.all:
                cell = f"{worst:.6g}" + ("" if da == db else f" ({da} vs {db})")
                rows.append((key, f"{tuple(sa)} {da}", f"{tuple(sb)} {db}", cell))
        for title, keys in ((f"only in A ({args.a})", only_a), (f"only in B ({args.b})", only_b)):
            if keys:
                print(f"{title}: {len(keys)}", file=out)
                for k in keys:
                    print(f"  {k}", file=out)
        if len(rows) > 1:
            _table(rows, out)
        common = len([k for k in a if k in b])
        verdict = "differ" if differs else "identical"
        print(f"{common} common keys; checkpoints {verdict}", file=out)
    return 1 if differs else 0


# --- entry point -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flax-registry",
        description="Inspect, convert and compare PyTorch / safetensors checkpoints without torch.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="list keys, shapes, dtypes, sizes and totals")
    i.add_argument("path")
    i.add_argument("--entry", help="nested state dict inside a torch checkpoint, e.g. 'state_dict'")
    i.add_argument("--limit", type=int, help="print at most this many keys")
    c = sub.add_parser("convert", help="convert a checkpoint's format (keys unchanged)")
    c.add_argument("src")
    c.add_argument("dst", help="a .safetensors file, or a new directory with --to orbax")
    c.add_argument("--to", choices=("safetensors", "orbax"), default="safetensors")
    c.add_argument("--entry", help="nested state dict inside a torch checkpoint")
    c.add_argument("--max-shard-size", help="write sharded safetensors, e.g. '5GB'")
    c.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="cast floating tensors"
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = sub.add_parser("diff", help="compare two checkpoints key by key")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--all", action="store_true", help="list identical keys too")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok; `diff`: 1 when the checkpoints differ;
    2 for a bad file or arguments, with a one-line message on stderr that names the file)."""
    args = _parser().parse_args(argv)
    commands = {"inspect": _inspect, "convert": _convert, "diff": _diff}
    try:
        return commands[args.command](args, sys.stdout)
    except (CheckpointError, OSError, ValueError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"flax-registry {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
