"""Python's cyclic garbage collector paused while a load runs.

A load allocates many objects that stay alive until it returns (the module tree flax sets up,
the plan, a torch zip's unpickled records), so CPython's collector runs its full, oldest
generation during it: a pass over every object the process holds (jax's, flax's, the
user's: 170,000 in a BERT-large benchmark), which finds almost nothing to free and took
20-100 ms of a 0.7 s load, while the reader threads wait for the GIL it holds. Pausing the
collector for the duration (reference counting still frees everything acyclic at once) and
restoring it after is what `timeit` does for the same reason. Nested and concurrent loads
share one pause; the collector is switched back on when the last of them ends, and only if
it was on when the first began.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_state = {"depth": 0, "was_enabled": False}


@contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (the state before it comes back after,
    on error too); cycles made inside are collected by the collector's next pass after. Also a
    decorator: `@collection_paused()` pauses it for each call."""
    with _lock:
        if _state["depth"] == 0:
            _state["was_enabled"] = gc.isenabled()
            gc.disable()
        _state["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0 and _state["was_enabled"]:
                gc.enable()
