"""Child process of test_scanned (a fresh interpreter: a clean memory baseline, or 8 simulated
devices, which jax fixes when it starts).

    python -m tests.convert._scanned_child rss DIR LAYERS HIDDEN INTER HEADS KV_HEADS HEAD_DIM
    python -m tests.convert._scanned_child devices DIR

`rss`: converts the sharded safetensors directory DIR into the scanned decoder and prints, as
JSON, the peak RSS the conversion added (Linux VmHWM, reset after the model is built), the
bytes of the output and of one layer. `devices`: converts DIR onto a (4, 2) mesh, checks the
values and shardings, and that each device block read only its own layers' ranges; prints OK.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections import defaultdict
from typing import Any

import jax
import numpy as np


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def rss(path: str, dims: list[int]) -> None:
    from flax_registry.convert import from_torch
    from tests.convert._layers import Config
    from tests.convert._scanned_model import RULES, TIED, ScannedDecoder

    layers, hidden, inter, heads, kv_heads, head_dim = dims
    c = Config(layers, hidden, heads, kv_heads, head_dim, inter, vocab=64)
    model = ScannedDecoder(c)
    ids = np.zeros((1, 4), np.int32)
    variables, _ = from_torch(model, path, example_inputs=(ids,), rules=RULES, tied=TIED)
    out = sum(leaf.nbytes for leaf in jax.tree.leaves(variables))
    scanned = sum(leaf.nbytes for leaf in jax.tree.leaves(variables["params"]["layers"]))
    del variables
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # measure the second conversion alone
        f.write("5")
    before = _rss()
    variables, report = from_torch(model, path, example_inputs=(ids,), rules=RULES, tied=TIED)
    assert report.ok, report
    peak = _hwm()
    print(
        json.dumps(
            {
                "extra": peak - before,
                "output": out,
                "layer": scanned // layers,
                "before": before,
                "peak": peak,
                "after": _rss(),
            }
        )
    )


def devices(path: str) -> None:
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import flax_registry.convert._sharding as sharding_module
    from flax_registry.checkpoint import sharding_rules
    from flax_registry.convert import from_torch
    from flax_registry.convert._source import Source
    from tests.convert._layers import Config
    from tests.convert._scanned_model import RULES, TIED, ScannedDecoder

    assert jax.device_count() == 8, jax.devices()
    c = Config(layers=24)
    model = ScannedDecoder(c)
    ids = np.zeros((1, 4), np.int32)
    reference, _ = from_torch(model, path, example_inputs=(ids,), rules=RULES, tied=TIED)

    calls: list[tuple[str, tuple[tuple[int, int], ...], list[tuple[str, int]]]] = []
    original_block, original_slice = sharding_module.read_variable_block, Source.read_slice

    def recording_block(source: Any, task: Any, index: Any) -> np.ndarray:
        calls.append((task.part.where, tuple((s.start, s.stop) for s in index), []))
        return original_block(source, task, index)

    def recording_slice(self: Source, key: str, index: Any) -> np.ndarray:
        out = original_slice(self, key, index)
        if calls:
            calls[-1][2].append((key, out.size))
        return out

    sharding_module.read_variable_block = recording_block
    Source.read_slice = recording_slice  # type: ignore[method-assign]
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("stage", "model"))
    specs = [
        ("layers.*.mlp.down_proj.weight", P("stage", "model")),  # linear (L, f, d)
        ("layers.*", P("stage")),  # every other scanned variable: 6 layers per stage
        ("embed_tokens.weight", P(None, "model")),
    ]
    sharded, report = from_torch(
        model,
        path,
        example_inputs=(ids,),
        rules=RULES,
        tied=TIED,
        shardings=sharding_rules(mesh, specs),
    )
    assert report.ok, report
    flat = dict(jax.tree_util.tree_leaves_with_path(reference))
    for kp, leaf in jax.tree_util.tree_leaves_with_path(sharded):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat[kp]), err_msg=str(kp))
        where = "/".join(p.key for p in kp)
        if "/layers/" in where:
            spec = P("stage", "model") if where.endswith("mlp/linear") else P("stage")
            assert leaf.sharding == NamedSharding(mesh, spec), (where, leaf.sharding)
    # One block read per device, and each read only its own 6 layers' keys (half of each
    # down_proj weight where the model axis splits it too).
    per_variable: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for where, ranges, got in calls:
        if "/layers/" not in where:
            continue
        start, stop = ranges[0]
        assert stop - start == 6, (where, ranges)
        keys = [k for k, _ in got]
        assert sorted({int(k.split(".")[1]) for k in keys}) == list(range(start, stop)), (
            where,
            ranges,
            keys,
        )
        assert len(keys) == len(set(keys)), keys  # each key read once per block
        if where.endswith("mlp/linear"):
            assert all(n == c.hidden * c.inter // 2 for _, n in got), (where, got)
        per_variable[where] += 1
        total[where] += sum(n for _, n in got)
    assert len(per_variable) == 7 and set(per_variable.values()) == {8}, per_variable
    for where, n in total.items():  # every element read twice: each stage's 2 devices
        leaf = flat[next(kp for kp in flat if "/".join(p.key for p in kp) == where)]
        replicas = 1 if where.endswith("mlp/linear") else 2
        assert n == replicas * leaf.size, (where, n, leaf.size)
    print("OK")


if __name__ == "__main__":
    mode, path, *rest = sys.argv[1:]
    if mode == "rss":
        rss(path, [int(n) for n in rest])
    else:
        devices(path)
