"""Waiting on many tasks (``taskray.get``/``wait``, the API's wait endpoint): woken by
completions on PostgreSQL, polling quickly on SQLite, reading only what is still pending."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from api.settings import Settings
from taskray.errors import StoreUnavailableError, UnknownTaskError
from taskray.models import Lease, TaskSpec, TaskState
from taskray.sdk import handles
from taskray.sdk.remote import RemoteBackend
from taskray.store import Store
from tests.ray_support import wait_for
from tests.test_api import serve


class CountingReads:
    """Wraps ``store.states_of`` (a waiter's read of the tasks it still waits for) to record
    the ids each read names."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        self.named: Counter[uuid.UUID] = Counter()
        self._lock = threading.Lock()
        original = store.states_of

        def states_of(task_ids: Any, **kwargs: Any) -> dict[uuid.UUID, TaskState]:
            ids = list(task_ids)
            with self._lock:
                self.sizes.append(len(ids))
                self.named.update(ids)
            return original(ids, **kwargs)

        monkeypatch.setattr(store, "states_of", states_of)

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.sizes)


def submit(store: Store, n: int, tenant: str = "default") -> list[uuid.UUID]:
    specs = [TaskSpec("tests:noop", payload=i, tenant=tenant) for i in range(n)]
    return [r.task.id for r in store.submit_many(specs)]


class Finisher:
    """Completes tasks (result: twice the payload), leasing whatever is ready first."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.leases: dict[uuid.UUID, Lease] = {}

    def __call__(self, ids: list[uuid.UUID]) -> None:
        self.leases.update({lease.task.id: lease for lease in self.store.claim(10_000)})
        for task_id in ids:
            lease = self.leases[task_id]
            self.store.complete(task_id, lease.lease_id, {"double": 2 * lease.task.payload})


@pytest.fixture
def finish(store: Store) -> Finisher:
    return Finisher(store)


@pytest.fixture
def in_background() -> Iterator[Any]:
    """Runs a function on a thread; the test joins it (and re-raises what it raised)."""
    threads: list[threading.Thread] = []

    def start(function: Any, *args: Any) -> dict[str, Any]:
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["value"] = function(*args)
            except BaseException as exc:  # handed to the test
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        outcome["thread"] = thread
        threads.append(thread)
        thread.start()
        return outcome

    yield start
    for thread in threads:
        thread.join(timeout=30)


def joined(outcome: dict[str, Any], timeout_s: float) -> Any:
    outcome["thread"].join(timeout=timeout_s)
    assert not outcome["thread"].is_alive(), f"still waiting after {timeout_s}s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_many_tasks_finishing_while_waiting_are_all_returned(
    store: Store, finish: Finisher, monkeypatch: pytest.MonkeyPatch, in_background: Any
) -> None:
    ids = submit(store, 1500)  # more than one read batch
    early, late = ids[:500], ids[500:]
    finish(early)
    reads = CountingReads(store, monkeypatch)
    progress: list[int] = []
    wait = functools.partial(handles.wait_terminal, on_progress=progress.append)
    waiting = in_background(wait, store, ids, len(ids), time.monotonic() + 120)
    finishing = in_background(finish, list(reversed(late)))
    joined(finishing, 120)
    done = joined(waiting, 60)
    assert set(done) == set(ids)
    assert all(done[i].status is TaskState.SUCCEEDED for i in ids)
    assert all(done[i].result == {"double": 2 * done[i].payload} for i in ids)
    assert progress == sorted(progress) and progress[-1] == len(ids)
    # Reads are batched, and a task known to be finished is not read again.
    assert max(reads.sizes) <= handles.READ_BATCH
    assert all(reads.named[i] == 1 for i in early)


def test_postgres_waiters_are_woken_by_a_completion_not_a_poll(
    store: Store,
    finish: Finisher,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
    in_background: Any,
) -> None:
    [task_id] = submit(store, 1)
    reads = CountingReads(store, monkeypatch)
    if backend == "postgresql":
        # Longer than the join below: only a notification can wake the waiter in time.
        monkeypatch.setattr(handles, "NOTIFIED_REREAD_S", 60.0)
    waiting = in_background(handles.wait_terminal, store, [task_id], 1, time.monotonic() + 120)
    # Once the waiter has read after opening its listener, it is listening.
    listening_reads = 2 if backend == "postgresql" else 1
    wait_for(lambda: reads.calls >= listening_reads, timeout_s=30, interval_s=0.002)
    before = reads.calls
    finish([task_id])
    done = joined(waiting, 20)
    assert done[task_id].result == {"double": 0}
    if backend == "postgresql":
        assert reads.calls - before <= 2  # woken, not polling


def test_num_returns_and_the_deadline_are_honoured(store: Store, finish: Finisher) -> None:
    finished, never = submit(store, 2)
    finish([finished])
    done = handles.wait_terminal(store, [finished, never], 2, time.monotonic() + 0.3)
    assert set(done) == {finished} and never not in done
    done = handles.wait_terminal(store, [never, finished], 1, time.monotonic() + 60)
    assert set(done) == {finished}
    # Nothing to wait for, or a deadline already past: one read, then the answer.
    assert handles.wait_terminal(store, [never], 0, None) == {}
    assert handles.wait_terminal(store, [never], 1, time.monotonic()) == {}


def test_tenant_scoped_waits_do_not_see_other_tenants(store: Store, finish: Finisher) -> None:
    [theirs] = submit(store, 1, tenant="globex")
    finish([theirs])
    with pytest.raises(UnknownTaskError):
        handles.wait_terminal(store, [theirs], 1, time.monotonic() + 5, tenant="acme")
    assert set(handles.wait_terminal(store, [theirs], 1, None, tenant="globex")) == {theirs}


def test_a_listener_that_cannot_be_opened_falls_back_to_polling(
    store: Store, finish: Finisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(**_: Any) -> Any:
        raise StoreUnavailableError("cannot open a listening connection to the store")

    monkeypatch.setattr(store, "done_listener", refuse)
    finished, never = submit(store, 2)
    finish([finished])
    done = handles.wait_terminal(store, [never, finished], 2, time.monotonic() + 0.2)
    assert set(done) == {finished}


def test_remote_mode_loops_long_polls_over_chunks_of_ids(
    database_url: str, monkeypatch: pytest.MonkeyPatch, in_background: Any
) -> None:
    store = Store.open(database_url, migrate=False)
    _, secret = store.create_key("acme", "notebook", ["read"])
    finish = Finisher(store)
    # Fewer ids per request than asked for: the first chunk long-polls, the rest are read.
    monkeypatch.setattr(handles, "REMOTE_MAX_IDS", 10)
    try:
        for url in serve(Settings(database_url=database_url)):
            backend = RemoteBackend(url, secret)
            try:
                ids = submit(store, 25, tenant="acme")
                never = submit(store, 1, tenant="acme")[0]
                waiting = in_background(handles._finished, backend, ids, len(ids), 60.0, True)
                joined(in_background(finish, list(reversed(ids))), 60)
                done = joined(waiting, 60)
                assert set(done) == set(ids)
                assert all(done[i].result == {"double": 2 * done[i].payload} for i in ids)
                # The one that never finishes is absent once the timeout runs out.
                done = handles._finished(backend, [never, *ids[:3]], 4, 0.3, False)
                assert set(done) == set(ids[:3])
                done = handles._finished(backend, [never, *ids], 1, None, False)
                assert never not in done and len(done) >= 1
            finally:
                backend.close()
    finally:
        store.close()
