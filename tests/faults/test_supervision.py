"""The scheduler's loop is supervised: a failed pass is retried, a service thread that dies
stops the loop, and a loop that ends on its own ends the actor's process (so Ray
restarts it) rather than leave a live actor that schedules nothing."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskray.scheduler import actor as actor_module
from taskray.scheduler.core import Scheduler, SchedulerConfig, TickReport
from taskray.store import Store
from tests.ray_support import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def sqlite(tmp_path: Path, fault_ray: None) -> Iterator[tuple[Store, str]]:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    store = Store.open(url)
    yield store, url
    store.close()


def run_in_thread(scheduler: Scheduler) -> tuple[threading.Thread, queue.Queue[BaseException]]:
    errors: queue.Queue[BaseException] = queue.Queue()

    def target() -> None:
        try:
            scheduler.run()
        except BaseException as exc:
            errors.put(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def test_a_failed_pass_is_retried(sqlite: tuple[Store, str]) -> None:
    store, url = sqlite
    scheduler = Scheduler(store, url, SchedulerConfig())
    passes: list[int] = []
    real_tick = scheduler.tick

    def flaky_tick() -> TickReport:
        passes.append(1)
        if len(passes) <= 3:
            raise ValueError("a bug in one pass")
        return real_tick()

    scheduler.tick = flaky_tick  # type: ignore[method-assign]
    thread, errors = run_in_thread(scheduler)
    try:
        wait_for(lambda: scheduler.epoch is not None, timeout_s=30)
        assert len(passes) > 3 and thread.is_alive()
    finally:
        scheduler.stop()
        thread.join(timeout=30)
        scheduler.resign()
    assert errors.empty()


def test_a_service_that_dies_stops_the_loop(sqlite: tuple[Store, str]) -> None:
    store, url = sqlite
    scheduler = Scheduler(store, url, SchedulerConfig())

    def broken_watch() -> None:
        raise RuntimeError("a bug in the lane watcher")

    scheduler._watch_lanes = broken_watch  # type: ignore[method-assign]
    thread, errors = run_in_thread(scheduler)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the loop ran on without its lane watcher"
    error = errors.get_nowait()
    assert isinstance(error, RuntimeError) and "lane watch" in str(error)
    scheduler.resign()


def test_the_actor_process_exits_when_its_loop_ends(
    sqlite: tuple[Store, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = sqlite
    exits: queue.Queue[int] = queue.Queue()
    # The actor's class, run in this process: its exit is recorded, not taken.
    monkeypatch.setattr(os, "_exit", exits.put)

    def loop_bug(self: Scheduler) -> None:
        raise RuntimeError("a bug that escapes the loop")

    monkeypatch.setattr(Scheduler, "run", loop_bug)
    scheduler_actor = actor_module._SchedulerActor(url)
    assert exits.get(timeout=30) == 1
    scheduler_actor._thread.join(timeout=10)
    assert not scheduler_actor.ready()
