"""The state API against PyTorch's on the same module tree, at several sizes.

The model is a `ModuleList` of n `Sequential(Linear(8, 8), BatchNorm1d(8))`, 7 state_dict
keys per block (5,600 keys at n = 800), written with `torch.nn` and with `flax_registry.nn`.
Each call is timed `--repeat` times, alternating PyTorch and flax_registry (the machine's load
then drifts over both alike), after one untimed warm-up call each (PyTorch's first call
allocates its caches; flax_registry's first call builds the module tree that later calls
re-fill from the structure cache). Per-key costs are microseconds per state_dict key.

    python benchmarks/state_api.py            # n = 50, 200, 800
    python benchmarks/state_api.py --sizes 800 --repeat 9
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def torch_model(n: int) -> Any:
    import torch

    return torch.nn.ModuleList(
        [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)) for _ in range(n)]
    )


def fr_model(n: int) -> Any:
    from flax_registry import nn

    return nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)) for _ in range(n)])


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def calls(n: int) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """(PyTorch call, flax_registry call) by name, on equal models."""
    import jax

    import flax_registry as fr

    tm, fm = torch_model(n), fr_model(n)
    variables = fr.init_variables(fm, jax.random.key(0))
    torch_sd = tm.state_dict()
    fr_sd = fr.state_dict(fm, variables)
    fr_sd_numpy = {k: np.asarray(v) for k, v in fr_sd.items()}
    assert list(torch_sd) == list(fr_sd)  # the same keys, in the same order
    return {
        "state_dict": (tm.state_dict, lambda: fr.state_dict(fm, variables)),
        "named_parameters": (
            lambda: list(tm.named_parameters()),
            lambda: list(fr.named_parameters(fm, variables)),
        ),
        "named_buffers": (
            lambda: list(tm.named_buffers()),
            lambda: list(fr.named_buffers(fm, variables)),
        ),
        "load_state_dict": (
            lambda: tm.load_state_dict(torch_sd),
            lambda: jax.block_until_ready(fr.load_state_dict(fm, variables, fr_sd)),
        ),
        "load_state_dict (numpy)": (
            lambda: tm.load_state_dict(torch_sd),
            lambda: jax.block_until_ready(fr.load_state_dict(fm, variables, fr_sd_numpy)),
        ),
        "abstract_variables": (lambda: None, lambda: fr.abstract_variables(fm)),
    }


def spread(values: list[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    v = sorted(x * scale for x in values)
    return f"{fmt.format(v[0])} / {fmt.format(float(np.median(v)))} / {fmt.format(v[-1])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[50, 200, 800])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(
        "per-key cost in microseconds (min / median / max of "
        f"{args.repeat} calls); ratio = flax_registry / PyTorch, from the same call pairs"
    )
    header = f"{'n':>4} {'keys':>5} {'call':<24} {'PyTorch us/key':>22} {'flax_registry us/key':>24} {'ratio':>20}"
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        keys = 7 * n
        for name, (torch_call, fr_call) in calls(n).items():
            torch_call(), fr_call()  # warm-up
            gc.collect()
            t_runs, f_runs = [], []
            for _ in range(args.repeat):
                t_runs.append(_time(torch_call))
                f_runs.append(_time(fr_call))
            per = 1e6 / keys
            if name == "abstract_variables":
                torch_col, ratio = "-", "-"
            else:
                torch_col = spread(t_runs, per)
                ratio = spread([f / t for f, t in zip(f_runs, t_runs)], fmt="{:.2f}")
            print(
                f"{n:>4} {keys:>5} {name:<24} {torch_col:>22} {spread(f_runs, per):>24} {ratio:>20}"
            )


if __name__ == "__main__":
    main()
