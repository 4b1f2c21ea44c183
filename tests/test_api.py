"""The REST API over HTTP: a real uvicorn server on loopback, on each backend."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from api import Settings, create_app
from taskray.errors import LeaseLostError
from taskray.models import TaskState
from taskray.store import Store
from tests.test_cli import taskray

PROBLEM = "application/problem+json"
#: Task types the test deployment registers (conftest.py names tests.handlers).
NOOP = "tests.handlers:noop"
ADD = "tests.handlers:add"


@dataclass
class Server:
    url: str
    store: Store
    admin: str  # secrets of keys of tenant "acme"
    submitter: str
    reader: str
    other: str  # tenant "globex", every scope

    def client(self, secret: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def serve(settings: Settings) -> Iterator[str]:
    """Run uvicorn in a thread on a free loopback port until the caller is done."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.01)  # polling the started flag, bounded by the deadline above
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def server(database_url: str) -> Iterator[Server]:
    store = Store.open(database_url, migrate=False)
    keys = {
        "admin": store.create_key("acme", "ops", ["admin"])[1],
        "submitter": store.create_key("acme", "svc", ["submit"])[1],
        "reader": store.create_key("acme", "dash", ["read"])[1],
        "other": store.create_key("globex", "all", ["admin"])[1],
    }
    settings = Settings(database_url=database_url, max_payload_bytes=64 * 1024)
    try:
        for url in serve(settings):
            yield Server(url=url, store=store, **keys)
    finally:
        store.close()


@pytest.fixture
def admin(server: Server) -> Iterator[httpx.Client]:
    with server.client(server.admin) as client:
        yield client


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    return dict(body)


def submit(client: httpx.Client, **fields: object) -> dict[str, object]:
    response = client.post("/v1/tasks", json={"type": NOOP, **fields})
    assert response.status_code == 201, response.text
    return dict(response.json())


# -- health -------------------------------------------------------------------------------------


def test_health_and_readiness(server: Server, admin: httpx.Client) -> None:
    assert admin.get("/healthz").json() == {"status": "ok"}
    not_ready = admin.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"]["scheduler"] != "ok"
    assert not_ready.json()["checks"]["database"] == "ok"
    server.store.acquire_leadership("scheduler-under-test", ttl_s=60)
    ready = admin.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "schema": "ok", "scheduler": "ok"}


def test_metrics_count_requests_and_tasks(server: Server, admin: httpx.Client) -> None:
    submit(admin)
    text = admin.get("/metrics").text
    assert 'taskray_tasks{state="queued"} 1.0' in text
    assert 'route="/v1/tasks"' in text
    with server.client(server.reader) as reader:
        assert_problem(reader.get("/metrics"), 403)


def test_openapi_schema_has_examples(admin: httpx.Client) -> None:
    schema = admin.get("/openapi.json").json()
    assert schema["components"]["schemas"]["TaskCreate"]["examples"]
    assert "/v1/tasks/batch" in schema["paths"]
    wait = schema["paths"]["/v1/tasks/wait"]["post"]
    assert {"200", "400", "404", "422"} <= set(wait["responses"])
    assert schema["components"]["schemas"]["TaskWait"]["examples"]


# -- auth -------------------------------------------------------------------------------------


def test_missing_or_bad_key_is_401_and_never_echoed(server: Server) -> None:
    with server.client(None) as anonymous:
        body = assert_problem(anonymous.get("/v1/tasks"), 401)
    with server.client("trk_not-a-real-key") as bad:
        response = bad.get("/v1/tasks")
        body = assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "trk_not-a-real-key" not in response.text
    assert body["status"] == 401


def test_revoked_key_is_refused(server: Server) -> None:
    key, secret = server.store.create_key("acme", "temp", ["read"])
    with server.client(secret) as client:
        assert client.get("/v1/tasks").status_code == 200
        server.store.revoke_key(key.id)
        assert_problem(client.get("/v1/tasks"), 401)


def test_scopes_are_enforced_with_403(server: Server, admin: httpx.Client) -> None:
    with server.client(server.reader) as reader:
        assert_problem(reader.post("/v1/tasks", json={"type": NOOP}), 403)
        assert reader.get("/v1/tasks").status_code == 200
    with server.client(server.submitter) as submitter:
        created = submit(submitter)
        assert_problem(submitter.get(f"/v1/tasks/{created['id']}"), 403)
        assert_problem(submitter.post("/v1/dead-letter/purge", json={}), 403)
    assert admin.get(f"/v1/tasks/{created['id']}").status_code == 200


def test_another_tenants_task_is_404(server: Server, admin: httpx.Client) -> None:
    created = submit(admin)
    with server.client(server.other) as other:
        assert_problem(other.get(f"/v1/tasks/{created['id']}"), 404)
        assert_problem(other.get(f"/v1/tasks/{created['id']}/attempts"), 404)
        assert_problem(other.post(f"/v1/tasks/{created['id']}/cancel"), 404)
        assert other.get("/v1/tasks").json()["tasks"] == []
        assert other.get("/v1/queues").json() == []
    assert server.store.get(str(created["id"])).status is TaskState.QUEUED


def test_auth_can_be_switched_off_explicitly(database_url: str) -> None:
    assert Settings(database_url=database_url).auth_enabled is True
    for url in serve(Settings(database_url=database_url, auth_enabled=False)):
        with httpx.Client(base_url=url) as client:
            created = client.post("/v1/tasks", json={"type": NOOP})
            assert created.status_code == 201
            assert client.get(f"/v1/tasks/{created.json()['id']}").status_code == 200


# -- submit -------------------------------------------------------------------------------------


def test_submit_then_get_with_attempts(server: Server, admin: httpx.Client) -> None:
    created = submit(
        admin,
        payload={"n": 1},
        queue="q1",
        priority=5,
        timeout_s=30,
        max_retries=2,
        resources={"num_cpus": 0.5, "memory": 1024},
        labels={"team": "a"},
        metadata={"by": "test"},
    )
    assert created["deduplicated"] is False and created["status"] == "queued"
    got = admin.get(f"/v1/tasks/{created['id']}").json()
    assert got["payload"] == {"n": 1} and got["queue"] == "q1" and got["priority"] == 5
    assert got["resources"]["num_cpus"] == 0.5 and got["attempts"] == []
    assert got["labels"] == {"team": "a"} and got["max_retries"] == 2
    lease = server.store.claim(1, node_id="node-a")[0]
    server.store.fail(lease.task.id, lease.lease_id, "boom")
    attempts = admin.get(f"/v1/tasks/{created['id']}/attempts").json()
    assert [(a["attempt"], a["outcome"], a["node_id"]) for a in attempts] == [
        (1, "failed", "node-a")
    ]
    assert admin.get(f"/v1/tasks/{created['id']}").json()["attempts"] == attempts


def test_idempotency_key_201_then_200(server: Server, admin: httpx.Client) -> None:
    headers = {"Idempotency-Key": "order-7"}
    first = admin.post("/v1/tasks", json={"type": NOOP, "payload": 1}, headers=headers)
    assert first.status_code == 201 and first.json()["deduplicated"] is False
    again = admin.post("/v1/tasks", json={"type": NOOP, "payload": 2}, headers=headers)
    assert again.status_code == 200 and again.json()["deduplicated"] is True
    assert again.json()["id"] == first.json()["id"] and again.json()["payload"] == 1
    by_field = admin.post("/v1/tasks", json={"type": NOOP, "idempotency_key": "order-7"})
    assert by_field.status_code == 200 and by_field.json()["id"] == first.json()["id"]
    # Keys are per tenant: the same key elsewhere is a new task.
    with server.client(server.other) as other:
        assert other.post("/v1/tasks", json={"type": NOOP}, headers=headers).status_code == 201
    mismatch = admin.post(
        "/v1/tasks", json={"type": NOOP, "idempotency_key": "a"}, headers={"Idempotency-Key": "b"}
    )
    assert_problem(mismatch, 400)


def test_dag_batch_by_client_keys(server: Server, admin: httpx.Client) -> None:
    response = admin.post(
        "/v1/tasks/batch",
        json={
            "tasks": [
                {"key": "load", "type": ADD, "depends_on": ["a", "b"]},
                {"key": "a", "type": NOOP},
                {"key": "b", "type": NOOP, "depends_on": ["a"]},
            ]
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["created"] == 3 and body["deduplicated"] == 0
    statuses = {t["type"] + str(t["pending_upstreams"]): t["status"] for t in body["tasks"]}
    assert statuses == {ADD + "2": "blocked", NOOP + "0": "queued", NOOP + "1": "blocked"}
    keys = body["keys"]
    assert server.store.upstreams(keys["load"]) == sorted(uuid.UUID(keys[k]) for k in ("a", "b"))


def test_cycle_is_422_naming_it_and_writes_nothing(server: Server, admin: httpx.Client) -> None:
    response = admin.post(
        "/v1/tasks/batch",
        json={
            "tasks": [
                {"key": "a", "type": NOOP, "depends_on": ["c"]},
                {"key": "b", "type": NOOP, "depends_on": ["a"]},
                {"key": "c", "type": NOOP, "depends_on": ["b"]},
            ]
        },
    )
    body = assert_problem(response, 422)
    cycle = body["cycle"]
    assert isinstance(cycle, list) and set(cycle) == {"a", "b", "c"} and cycle[0] == cycle[-1]
    assert "a" in str(body["detail"]) and "->" in str(body["detail"])
    assert server.store.count_by_status() == {}


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"type": "bad type!"}, 422),
        ({"type": NOOP, "resources": {"num_cpus": -1}}, 422),
        ({"type": NOOP, "resources": {"custom": {"GPU": 1}}}, 422),
        ({"type": NOOP, "resources": {"num_gpus": 1.5}}, 422),
        ({"type": NOOP, "timeout_s": -5}, 422),
        ({"type": NOOP, "priority": 5000}, 422),
        ({"type": NOOP, "unknown_field": 1}, 422),
        ({"type": NOOP, "depends_on": [str(uuid.uuid4())]}, 422),
        ({"type": NOOP, "key": "only-in-batches"}, 400),
        ({"type": NOOP, "scheduled_at": "0001-01-01T00:00:00+05:00"}, 422),
        # Types shipped by value, and types the deployment did not register, name code.
        ({"type": "pickled:f/" + "0" * 64}, 422),
        ({"type": "os:system", "payload": {"args": ["true"]}}, 422),
        ({"type": "tests.handlers:_count_call"}, 422),
    ],
)
def test_bad_input_is_a_4xx_problem_and_writes_nothing(
    server: Server, admin: httpx.Client, fields: dict[str, object], status: int
) -> None:
    assert_problem(admin.post("/v1/tasks", json=fields), status)
    assert server.store.count_by_status() == {}


def test_a_value_the_database_cannot_hold_is_422(
    server: Server, admin: httpx.Client, backend: str
) -> None:
    response = admin.post("/v1/tasks", json={"type": NOOP, "payload": "x\u0000y"})
    if backend == "sqlite":
        # SQLite keeps NUL characters; PostgreSQL's text and JSON cannot.
        assert response.status_code == 201
        return
    assert_problem(response, 422)
    assert server.store.count_by_status() == {}


def test_malformed_json_is_a_problem(admin: httpx.Client) -> None:
    response = admin.post(
        "/v1/tasks", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(response, 422)


def test_oversized_payload_is_413(server: Server, admin: httpx.Client) -> None:
    big = "x" * (65 * 1024)
    body = assert_problem(admin.post("/v1/tasks", json={"type": NOOP, "payload": big}), 413)
    assert "limit" in str(body["detail"])
    assert server.store.count_by_status() == {}


def test_oversized_body_is_413_before_parsing(database_url: str) -> None:
    settings = Settings(database_url=database_url, auth_enabled=False, max_body_bytes=1000)
    for url in serve(settings):
        with httpx.Client(base_url=url) as client:
            body = {"type": NOOP, "payload": "x" * 2000}
            assert_problem(client.post("/v1/tasks", json=body), 413)

            def chunks() -> Iterator[bytes]:
                yield b'{"type": "tests.handlers:noop", "payload": "'
                yield b"x" * 2000
                yield b'"}'

            assert_problem(client.post("/v1/tasks", content=chunks()), 413)


# -- read ---------------------------------------------------------------------------------------


def test_list_filters_and_cursor_pages(server: Server, admin: httpx.Client) -> None:
    batch = [
        {"type": ADD if i % 2 else NOOP, "queue": "q", "labels": {"n": str(i % 3)}}
        for i in range(7)
    ]
    assert admin.post("/v1/tasks/batch", json={"tasks": batch}).status_code == 201
    submit(admin, queue="other")
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"queue": "q", "limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = admin.get("/v1/tasks", params=params).json()
        seen.extend(t["id"] for t in page["tasks"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 7 == len(set(seen))
    assert len(admin.get("/v1/tasks", params={"type": ADD}).json()["tasks"]) == 3
    assert len(admin.get("/v1/tasks", params={"label": "n=0"}).json()["tasks"]) == 3
    both = admin.get("/v1/tasks", params={"label": "n=0", "type": NOOP}).json()["tasks"]
    assert len(both) == 2
    assert len(admin.get("/v1/tasks", params={"status": "queued"}).json()["tasks"]) == 8
    assert admin.get("/v1/tasks", params={"status": "dead"}).json()["tasks"] == []
    future = admin.get("/v1/tasks", params={"created_from": "2999-01-01T00:00:00Z"})
    assert future.json()["tasks"] == []
    past = admin.get("/v1/tasks", params={"created_before": "2999-01-01T00:00:00Z"})
    assert len(past.json()["tasks"]) == 8
    assert_problem(admin.get("/v1/tasks", params={"cursor": "garbage"}), 400)
    assert_problem(admin.get("/v1/tasks", params={"label": "novalue"}), 400)
    assert_problem(admin.get("/v1/tasks", params={"status": "nope"}), 422)


def test_unknown_task_and_route_are_404_problems(admin: httpx.Client) -> None:
    assert_problem(admin.get(f"/v1/tasks/{uuid.uuid4()}"), 404)
    assert_problem(admin.get("/v1/tasks/not-a-uuid"), 422)
    assert_problem(admin.get("/v1/nothing-here"), 404)


def test_queue_stats(server: Server, admin: httpx.Client) -> None:
    for priority in (1, 1, 5):
        submit(admin, queue="stats", priority=priority)
    done = submit(admin, queue="stats")
    lease = server.store.claim(1, queues=["stats"])[0]
    server.store.complete(lease.task.id, lease.lease_id, "ok")
    stats = admin.get("/v1/queues/stats").json()
    assert stats["by_state"] == {"queued": 3, "succeeded": 1}
    depth = {(d["status"], d["priority"]): d["count"] for d in stats["depth"]}
    assert sum(depth.values()) == 3 and depth[("queued", 1)] >= 1
    assert stats["finished_in_window"] == {"succeeded": 1}
    assert stats["oldest_ready_age_s"] is not None and stats["oldest_ready_age_s"] >= 0
    assert [q["queue"] for q in admin.get("/v1/queues").json()] == ["stats"]
    assert admin.get("/v1/queues/empty").json()["by_state"] == {}
    assert done["queue"] == "stats"


# -- wait ---------------------------------------------------------------------------------------


def finish(server: Server, task_id: object, queue: str, result: object = None) -> None:
    """Complete ``task_id`` (alone in ``queue``), or dead-letter it when ``result`` is None."""
    lease = server.store.claim(1, queues=[queue])[0]
    assert str(lease.task.id) == str(task_id)
    if result is None:
        server.store.fail(lease.task.id, lease.lease_id, "poison", retryable=False)
    else:
        server.store.complete(lease.task.id, lease.lease_id, result)


def test_wait_answers_with_the_finished_tasks(server: Server, admin: httpx.Client) -> None:
    done = submit(admin, queue="w-done")
    dead = submit(admin, queue="w-dead")
    never = submit(admin, queue="w-never")
    finish(server, done["id"], "w-done", {"answer": 42})
    finish(server, dead["id"], "w-dead")
    ids = [never["id"], done["id"], dead["id"]]
    response = admin.post("/v1/tasks/wait", json={"ids": ids, "num_returns": 2, "timeout": 30})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [t["id"] for t in body["tasks"]] == [done["id"], dead["id"]]  # in the order asked
    assert body["pending"] == 1
    finished, failed = body["tasks"]
    assert finished["status"] == "succeeded" and finished["result"] == {"answer": 42}
    assert failed["status"] == "dead" and "poison" in failed["last_error"]
    # Waiting for all of them: the answer comes when the timeout runs out, without the
    # one that never finishes. A repeated id counts once.
    response = admin.post("/v1/tasks/wait", json={"ids": [*ids, done["id"]], "timeout": 0.5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert never["id"] not in {t["id"] for t in body["tasks"]}
    assert {t["id"] for t in body["tasks"]} == {done["id"], dead["id"]}
    assert body["pending"] == 1
    # Reading needs the read scope, as GET does.
    with server.client(server.reader) as reader:
        assert reader.post("/v1/tasks/wait", json={"ids": ids, "timeout": 0}).status_code == 200
    with server.client(server.submitter) as submitter:
        assert_problem(submitter.post("/v1/tasks/wait", json={"ids": ids}), 403)


def test_wait_returns_when_a_task_finishes(server: Server, admin: httpx.Client) -> None:
    created = submit(admin, queue="w-wake")
    answers: list[httpx.Response] = []

    def wait() -> None:
        with server.client(server.reader) as reader:
            answers.append(reader.post("/v1/tasks/wait", json={"ids": [created["id"]]}))

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    finish(server, created["id"], "w-wake", [1, 2])
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    [response] = answers
    assert response.status_code == 200, response.text
    [task] = response.json()["tasks"]
    assert task["id"] == created["id"] and task["result"] == [1, 2]
    assert response.json()["pending"] == 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"ids": ["not-a-uuid"]}, 422),
        ({"ids": []}, 422),
        ({"ids": "TASK"}, 422),
        ({"ids": [str(uuid.UUID(int=i)) for i in range(10_001)], "timeout": 0}, 422),
        ({"ids": ["TASK"], "timeout": -1}, 422),
        ({"ids": ["TASK"], "timeout": 61}, 422),
        ({"ids": ["TASK"], "timeout": "soon"}, 422),
        ({"ids": ["TASK"], "num_returns": -1}, 422),
        ({"ids": ["TASK", "TASK"], "num_returns": 2}, 400),
        ({"ids": ["TASK"], "unknown_field": 1}, 422),
        ({"ids": ["TASK", str(uuid.uuid4())], "timeout": 0}, 404),
    ],
)
def test_wait_refuses_bad_input_with_a_reason(
    admin: httpx.Client, body: dict[str, object], status: int
) -> None:
    task_id = submit(admin)["id"]
    raw = json.dumps(body).replace('"TASK"', json.dumps(task_id))
    response = admin.post(
        "/v1/tasks/wait", content=raw, headers={"content-type": "application/json"}
    )
    assert_problem(response, status)


def test_wait_refuses_a_timeout_that_is_not_a_number(admin: httpx.Client) -> None:
    task_id = submit(admin)["id"]
    raw = f'{{"ids": ["{task_id}"], "timeout": NaN}}'
    response = admin.post(
        "/v1/tasks/wait", content=raw, headers={"content-type": "application/json"}
    )
    assert_problem(response, 422)


def test_wait_hides_another_tenants_tasks(server: Server, admin: httpx.Client) -> None:
    created = submit(admin, queue="w-hidden")
    finish(server, created["id"], "w-hidden", "secret")
    with server.client(server.other) as other:
        own = submit(other)
        body = assert_problem(
            other.post("/v1/tasks/wait", json={"ids": [own["id"], created["id"]], "timeout": 0}),
            404,
        )
        assert str(created["id"]) in str(body["detail"]) and "secret" not in str(body)
    found = admin.post("/v1/tasks/wait", json={"ids": [created["id"]], "timeout": 0}).json()
    assert [t["result"] for t in found["tasks"]] == ["secret"]


# -- cancel -------------------------------------------------------------------------------------


def test_cancel_a_running_task_fences_its_lease(server: Server, admin: httpx.Client) -> None:
    created = submit(admin)
    lease = server.store.claim(1, node_id="node-1")[0]
    server.store.start(lease.task.id, lease.lease_id)
    assert admin.get(f"/v1/tasks/{created['id']}").json()["status"] == "running"
    response = admin.post(f"/v1/tasks/{created['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    with pytest.raises(LeaseLostError):
        server.store.heartbeat(lease.task.id, lease.lease_id)
    attempts = admin.get(f"/v1/tasks/{created['id']}/attempts").json()
    assert attempts[0]["outcome"] == "cancelled"
    # A second cancel conflicts with the state it is in.
    assert_problem(admin.post(f"/v1/tasks/{created['id']}/cancel"), 409)


# -- dead letter --------------------------------------------------------------------------------


def kill(server: Server, admin: httpx.Client, queue: str = "dlq") -> str:
    created = submit(admin, queue=queue, max_retries=0)
    lease = server.store.claim(1, queues=[queue])[0]
    server.store.fail(lease.task.id, lease.lease_id, "poison")
    return str(created["id"])


def test_dead_letter_list_get_replay_purge(server: Server, admin: httpx.Client) -> None:
    first, second, third = (kill(server, admin) for _ in range(3))
    alive = submit(admin)
    listed = admin.get("/v1/dead-letter").json()
    assert {t["id"] for t in listed} == {first, second, third}
    got = admin.get(f"/v1/dead-letter/{first}").json()
    assert got["status"] == "dead" and got["attempts"][0]["outcome"] == "failed"
    assert_problem(admin.get(f"/v1/dead-letter/{alive['id']}"), 404)
    with server.client(server.reader) as reader:
        assert len(reader.get("/v1/dead-letter").json()) == 3
        assert_problem(reader.post(f"/v1/dead-letter/{first}/replay"), 403)
    replayed = admin.post(f"/v1/dead-letter/{first}/replay")
    assert replayed.status_code == 200 and replayed.json()["status"] == "queued"
    assert_problem(admin.post(f"/v1/dead-letter/{first}/replay"), 409)
    assert_problem(admin.post(f"/v1/dead-letter/{uuid.uuid4()}/replay"), 404)
    with server.client(server.other) as other:
        assert_problem(other.post(f"/v1/dead-letter/{second}/replay"), 404)
        assert other.post("/v1/dead-letter/purge", json={}).json() == {"purged": 0}
    by_filter = admin.post("/v1/dead-letter/replay", json={"queue": "dlq"}).json()
    assert by_filter["replayed"] == 2 and set(by_filter["task_ids"]) == {second, third}
    doomed = kill(server, admin, queue="dlq2")
    purged = admin.post("/v1/dead-letter/purge", json={"task_ids": [doomed]}).json()
    assert purged == {"purged": 1}
    assert_problem(admin.get(f"/v1/tasks/{doomed}"), 404)
    kill(server, admin, queue="dlq3")
    assert admin.post("/v1/dead-letter/purge", json={"queue": "dlq3"}).json() == {"purged": 1}


# -- the OpenAPI contract -----------------------------------------------------------------------


def test_schemathesis_finds_no_server_error_or_schema_violation(server: Server) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    # /readyz answers 503 by design while no scheduler leads; give it one.
    server.store.acquire_leadership("scheduler-under-test", ttl_s=600)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    headers = {"Authorization": f"Bearer {server.admin}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        # Bounded: a few examples per operation keeps the whole run well under a minute.
        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def exercise(case: schemathesis.Case) -> None:
            case.call_and_validate(
                headers=headers, checks=[not_a_server_error, response_schema_conformance]
            )

        exercise()


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_keys_create_list_revoke(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    assert taskray("db", "upgrade", database_url=url).returncode == 0
    created = taskray(
        "keys", "create", "--tenant", "acme", "--name", "ci", "--scope", "read", database_url=url
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("trk_") and secret not in created.stderr
    listed = taskray("keys", "list", "--json", database_url=url)
    rows = json.loads(listed.stdout)
    assert [(r["tenant"], r["name"], r["scopes"]) for r in rows] == [("acme", "ci", ["read"])]
    assert secret not in listed.stdout
    with Store.open(url, migrate=False) as store:
        key = store.authenticate(secret)
        assert key is not None and key.tenant == "acme"
        revoked = taskray("keys", "revoke", str(key.id), database_url=url)
        assert revoked.returncode == 0, revoked.stderr
        assert store.authenticate(secret) is None
    assert json.loads(taskray("keys", "list", "--json", database_url=url).stdout) == []
    bad = taskray(
        "keys", "create", "--tenant", "a", "--name", "n", "--scope", "root", database_url=url
    )
    assert bad.returncode == 2 and "scopes must be" in bad.stderr
