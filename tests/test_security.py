"""Closed to strangers: only registered task types run, JSON from a client is never
unpickled, and the database password stays out of what Ray shows.

Against a live API server (uvicorn on loopback) and a scheduler dispatching to a local
Ray, on both backends. The test session registers ``tests.handlers`` and
``tests.sdk_functions`` (conftest.py sets ``TASKRAY_TASK_MODULES``; Ray's workers inherit
it).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import pickle
import secrets
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

import taskray
from api import Settings
from taskray import serialization
from taskray.errors import UnregisteredTaskTypeError
from taskray.models import AttemptOutcome, Encoding, TaskState
from taskray.registry import TaskRegistry, is_task
from taskray.scheduler.actor import start_scheduler, stop_scheduler
from taskray.scheduler.core import SchedulerConfig
from taskray.sdk.handles import TaskHandle
from taskray.store import Store
from taskray.testing import make_spec
from tests import handlers, sdk_functions
from tests.ray_support import local_ray, running_scheduler, wait_for
from tests.test_api import assert_problem, serve

UNREGISTERED = "https://taskray.dev/problems/unregistered-task-type"


class _MakeDir:
    """Bait: unpickling this creates the directory ``path`` (code runs on unpickling)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.path,))


def pickle_bait(marker: Path) -> dict[str, str]:
    """A JSON value shaped like a pickled one, whose unpickling would create ``marker``."""
    blob = base64.b64encode(pickle.dumps(_MakeDir(marker))).decode("ascii")
    return {serialization.PICKLE_KEY: blob}


def attacks(markers: Path) -> dict[str, object]:
    """Task type -> payload: each would run code on a worker if its type were resolved by
    importing what it names. Those that can leave a trace would create a marker."""
    return {
        "os:system": {"args": [f"mkdir {markers / 'os-system'}"]},
        "builtins:exec": {"args": [f"import os; os.mkdir({str(markers / 'exec')!r})"]},
        "subprocess:run": {"args": [["mkdir", str(markers / "run")]]},
        "subprocess:check_output": {"args": [["mkdir", str(markers / "check-output")]]},
        "importlib:import_module": {"args": ["antigravity"]},
        "os:environ.copy": None,
        "builtins:dict": {"kwargs": {"echo": pickle_bait(markers / "dict")}},
        # Inside a registered module: an attribute path, an unmarked helper, an import.
        "tests.handlers:os.system": {"args": [f"mkdir {markers / 'dotted'}"]},
        "tests.handlers:_count_call": {"args": [str(markers / "helper")]},
        "tests.handlers:NonRetryableError": {"args": ["x"]},
    }


@dataclasses.dataclass
class Api:
    url: str
    store: Store
    #: A key of tenant "acme" with the submit and read scopes only.
    submitter: str

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.submitter}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def api(database_url: str) -> Iterator[Api]:
    store = Store.open(database_url, migrate=False)
    secret = store.create_key("acme", "svc", ["submit", "read"])[1]
    settings = Settings(database_url=database_url, task_modules=("tests.handlers",))
    try:
        for url in serve(settings):
            yield Api(url, store, secret)
    finally:
        store.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ray_dashboard() -> Iterator[str]:
    """A local Ray for this module, with its dashboard (Ray's state API); its URL."""
    port = free_port()
    with local_ray(num_cpus=2, dashboard_port=port):
        yield f"http://127.0.0.1:{port}"


def finished(store: Store, ids: list[uuid.UUID]) -> bool:
    return all(t.status.is_terminal for t in store.get_many(ids))


# -- the registry ---------------------------------------------------------------------------


def test_the_registry_holds_marked_functions_of_listed_modules_only() -> None:
    registry = TaskRegistry(["tests.handlers", "tests.sdk_functions"])
    assert registry.resolve("tests.handlers:add") is handlers.add
    assert registry.resolve("tests.sdk_functions:add") is sdk_functions.add
    assert is_task(sdk_functions.add) and is_task(handlers.echo)
    assert not is_task(handlers._count_call)
    for task_type in attacks(Path("/nonexistent")):
        with pytest.raises(UnregisteredTaskTypeError, match="not registered"):
            registry.resolve(task_type)
    # A module not listed is never imported because a task named it.
    with pytest.raises(UnregisteredTaskTypeError, match="not one of this deployment"):
        TaskRegistry(["tests.handlers"]).resolve("tests.sdk_functions:add")
    with pytest.raises(UnregisteredTaskTypeError, match="cannot be imported"):
        TaskRegistry(["tests.no_such_module"]).load_all()


# -- over HTTP ------------------------------------------------------------------------------


def test_the_api_refuses_unregistered_types_and_writes_nothing(api: Api, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    refused: dict[int, int] = {}
    with api.client() as client:
        for task_type, payload in attacks(markers).items():
            response = client.post("/v1/tasks", json={"type": task_type, "payload": payload})
            body = assert_problem(response, 422)
            refused[422] = refused.get(422, 0) + 1
            assert body["type"] == UNREGISTERED
            assert task_type in str(body["detail"]) and "not registered" in str(body["detail"])
            # In a batch, one such task refuses the whole batch, and says which one.
            batch = {"tasks": [{"type": "tests.handlers:add"}, {"type": task_type}]}
            body = assert_problem(client.post("/v1/tasks/batch", json=batch), 422)
            refused[422] += 1
            assert str(body["detail"]).startswith("tasks[1]: ")
        # Types shipped by value are the Python SDK's alone.
        pickled = {"type": "pickled:f/" + "0" * 64}
        assert_problem(client.post("/v1/tasks", json=pickled), 422)
        assert api.store.count_by_status() == {}
        assert list(markers.iterdir()) == []
        # The refusals are about the type: a registered one is accepted.
        accepted = client.post("/v1/tasks", json={"type": "tests.handlers:add"})
        assert accepted.status_code == 201, accepted.text
    assert refused == {422: 2 * len(attacks(markers))}


# -- on the workers -------------------------------------------------------------------------


@pytest.mark.slow
def test_the_executor_dead_letters_unregistered_types_written_into_the_database(
    ray_dashboard: str, database_url: str, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    store = Store.open(database_url, migrate=False)
    try:
        # Straight into the store, past the API: the executor is the last line.
        written = attacks(markers)
        specs = [make_spec(t, payload=p, max_retries=3) for t, p in written.items()]
        control = make_spec("tests.handlers:add", payload={"args": [2, 3]})
        ids = [r.task.id for r in store.submit_many([*specs, control])]
        with running_scheduler(store, database_url):
            wait_for(lambda: finished(store, ids), timeout_s=120)
        *refused, ran = store.get_many(ids)
        assert ran.status is TaskState.SUCCEEDED and ran.result == 5
        for task in refused:
            assert task.status is TaskState.DEAD, task.type
            assert task.last_error and "not registered" in task.last_error, task.last_error
            [attempt] = store.attempts(task.id)  # non-retryable: one try despite max_retries
            assert attempt.outcome is AttemptOutcome.FAILED
        assert list(markers.iterdir()) == []
    finally:
        store.close()


@pytest.mark.slow
def test_a_trusted_python_client_runs_its_own_functions_the_api_does_not(
    ray_dashboard: str, database_url: str, api: Api
) -> None:
    # A client holding the database is trusted (it could ship any function by value): an
    # importable function it submits runs under its module:function type although no task
    # module lists it, because the client registered it in the store. Over HTTP the
    # deployment's modules alone decide, so the same type is refused there.
    taskray.init(database_url, start_scheduler_actor=False)
    try:
        hypot = taskray.task(math.hypot)
        handle = hypot.submit(3, 4)
        assert handle.type == "math:hypot"
        with running_scheduler(api.store, database_url):
            assert taskray.get(handle, timeout=120) == 5.0
        # Its arguments and result travelled pickled, and the task says so.
        assert handle.task().encoding is Encoding.PICKLE
    finally:
        taskray.shutdown()
    with api.client() as client:
        body = assert_problem(client.post("/v1/tasks", json={"type": "math:hypot"}), 422)
    assert body["type"] == UNREGISTERED


@pytest.mark.slow
def test_json_from_a_client_is_never_unpickled(
    ray_dashboard: str, database_url: str, api: Api, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    # The bait is live: decoded as a pickle, it creates its marker.
    probe = tmp_path / "probe"
    serialization.decode(pickle_bait(probe), Encoding.PICKLE)
    assert probe.is_dir()
    bait = pickle_bait(markers / "bait")
    echo = "tests.handlers:echo"
    with api.client() as client:
        first = client.post("/v1/tasks", json={"type": echo, "payload": {"kwargs": {"v": bait}}})
        assert first.status_code == 201, first.text
        assert first.json()["encoding"] == "json"
        first_id = first.json()["id"]
        # Downstream: receives the first task's result in place of the upstream marker.
        upstream = {serialization.UPSTREAM_KEY: first_id}
        downstream = client.post(
            "/v1/tasks",
            json={"type": echo, "payload": {"kwargs": {"up": upstream}}, "depends_on": [first_id]},
        )
        # The whole payload shaped like a pickle: the single argument, as JSON.
        whole = client.post("/v1/tasks", json={"type": echo, "payload": bait})
        assert downstream.status_code == whole.status_code == 201
    ids = [uuid.UUID(first_id), uuid.UUID(downstream.json()["id"]), uuid.UUID(whole.json()["id"])]
    with running_scheduler(api.store, database_url):
        wait_for(lambda: finished(api.store, ids), timeout_s=120)
    one, two, three = api.store.get_many(ids)
    assert [t.status for t in (one, two, three)] == [TaskState.SUCCEEDED] * 3
    assert all(t.encoding is Encoding.JSON for t in (one, two, three))
    # On the worker the handler got the dict itself, and returned it as JSON.
    assert one.result == {"args": [], "kwargs": {"v": bait}, "kinds": {"v": "dict"}}
    assert two.result == {"args": [], "kwargs": {"up": one.result}, "kinds": {"up": "dict"}}
    assert three.result == {"args": [bait], "kwargs": {}, "kinds": {}}
    # A Python client with the database reads the result as the JSON it is.
    taskray.init(database_url, start_scheduler_actor=False)
    try:
        assert taskray.get(TaskHandle(one.id, one.type), timeout=10) == one.result
    finally:
        taskray.shutdown()
    assert list(markers.iterdir()) == []


# -- what Ray shows ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"])
def test_no_database_password_in_rays_state_api(ray_dashboard: str, database_url: str) -> None:
    from ray.util import state

    # The test server trusts local connections, so any password gets in: a random one
    # is then a string that appears only where the URL travelled.
    password = secrets.token_hex(12)
    url = make_url(database_url).set(password=password).render_as_string(hide_password=False)
    name = f"taskray-security-{uuid.uuid4().hex[:8]}"
    store = Store.open(database_url, migrate=False)
    try:
        # The scheduler as deployed: an actor (the URL is its constructor argument), which
        # starts the node agents and dispatches lanes to Ray.
        scheduler = start_scheduler(
            url, SchedulerConfig(reap_interval_s=1.0), name=name, detached=False
        )
        try:
            task = store.submit(make_spec("tests.handlers:add", payload={"args": [1, 2]})).task
            # As the SDK does after a submit: the actor then leases and dispatches at once.
            scheduler.wake.remote()
            wait_for(lambda: store.get(task.id).status is TaskState.SUCCEEDED, timeout_s=120)

            # Everything the state API holds (its default page is 100 records, its largest 10,000).
            everything = {"address": ray_dashboard, "limit": 10_000}
            lane = f"taskray:{task.type}:{task.id}"

            def lane_reported() -> list[Any]:
                # Ray reports task events to its state API a second or so after they happen.
                lanes = state.list_tasks(filters=[("name", "=", lane)], detail=True, **everything)
                return lanes if any(t.state == "FINISHED" for t in lanes) else []

            wait_for(lane_reported, timeout_s=60, interval_s=0.5)
            shown = {
                "tasks": state.list_tasks(detail=True, **everything),
                "actors": state.list_actors(detail=True, **everything),
                "workers": state.list_workers(detail=True, **everything),
                "jobs": state.list_jobs(address=ray_dashboard),
            }
        finally:
            stop_scheduler(name)
    finally:
        store.close()
    text = json.dumps({k: [as_data(v) for v in vs] for k, vs in shown.items()}, default=str)
    # What was read covers the dispatch: the scheduler actor, its node agent, the lane.
    assert name in text and "taskray-node-" in text and lane in text
    assert password not in text
    # Nor a digest of it (one of the whole URL could be checked against guesses offline).
    assert hashlib.sha256(url.encode()).hexdigest()[:12] not in text


def as_data(value: Any) -> Any:
    """A state API record as plain data (dataclasses, and pydantic models for jobs)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if hasattr(value, "dict"):
        return value.dict()
    return vars(value)
