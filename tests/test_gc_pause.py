"""The cyclic garbage collector is paused while a load runs, and comes back as it was: after a
load, after a failed one, after nested and concurrent ones; off stays off."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import flax_registry as fr
from flax_registry import io, nn
from flax_registry._gc_pause import collection_paused
from flax_registry.io import _reader

STATE = {
    "weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "bias": np.array([0.5, -0.5], np.float32),
}


@pytest.fixture(autouse=True)
def _collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    gc.enable() if was else gc.disable()


def _recording_renames(seen: list[bool]):  # type: ignore[no-untyped-def]
    def rename(key: str) -> str:
        seen.append(gc.isenabled())
        return key

    return rename


def _record_collector(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[bool]:
    """Whether the collector was on at each call of `owner.name` (patched for the test)."""
    seen: list[bool] = []
    original = getattr(owner, name)

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(gc.isenabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return seen


def test_from_torch_runs_without_the_collector_and_restores_it() -> None:
    seen: list[bool] = []
    layer = nn.Linear(3, 2)
    variables, report = fr.from_torch(
        layer, STATE, variables=fr.abstract_variables(layer), renames=_recording_renames(seen)
    )
    assert report.ok and seen and not any(seen)
    assert gc.isenabled()
    np.testing.assert_array_equal(variables["params"]["weight"], STATE["weight"])


def test_to_torch_runs_without_the_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    from flax_registry.convert import _export

    seen = _record_collector(monkeypatch, _export, "_export")
    layer = nn.Linear(3, 2)
    variables, _ = fr.from_torch(layer, STATE, variables=fr.abstract_variables(layer))
    exported = fr.to_torch(layer, variables)
    assert seen == [False, False] and gc.isenabled()
    np.testing.assert_array_equal(exported["weight"], STATE["weight"])


def test_a_failed_load_restores_the_collector() -> None:
    layer = nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="Missing key"):
        fr.from_torch(layer, {"weight": STATE["weight"]}, variables=fr.abstract_variables(layer))
    assert gc.isenabled()


def test_a_collector_the_user_switched_off_stays_off() -> None:
    gc.disable()
    layer = nn.Linear(3, 2)
    fr.from_torch(layer, STATE, variables=fr.abstract_variables(layer))
    assert not gc.isenabled()


def test_open_checkpoint_pauses_the_collector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.safetensors"
    io.save_safetensors(STATE, path)
    seen = _record_collector(monkeypatch, _reader, "_open_file")
    with io.open_checkpoint(path) as reader:
        assert sorted(reader) == ["bias", "weight"]
    assert seen == [False] and gc.isenabled()


def test_nested_and_concurrent_pauses_end_with_the_last() -> None:
    inside = threading.Barrier(2)
    first_left = threading.Event()
    states: dict[str, bool] = {}

    def short() -> None:
        with collection_paused():
            inside.wait(timeout=10)
        first_left.set()

    def long() -> None:
        with collection_paused():
            inside.wait(timeout=10)
            first_left.wait(timeout=10)
            states["after the other ended"] = gc.isenabled()
            with collection_paused():
                pass
            states["after a nested one"] = gc.isenabled()

    threads = [threading.Thread(target=short), threading.Thread(target=long)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert states == {"after the other ended": False, "after a nested one": False}
    assert gc.isenabled()


def test_cycles_made_during_a_load_are_collected_after() -> None:
    import weakref

    refs: list[weakref.ref[object]] = []

    class Cycle:
        pass

    def rename(key: str) -> str:
        c = Cycle()
        c.self = c  # type: ignore[attr-defined]
        refs.append(weakref.ref(c))
        return key

    layer = nn.Linear(3, 2)
    fr.from_torch(layer, STATE, variables=fr.abstract_variables(layer), renames=rename)
    gc.collect()
    assert refs
    assert all(r() is None for r in refs)
