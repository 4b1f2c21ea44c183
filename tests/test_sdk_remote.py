"""The SDK in remote mode: the same calls, over the REST API, with tasks run by Ray."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import taskray
from api.settings import Settings
from taskray.models import TaskSpec, TaskState
from taskray.serialization import UPSTREAM_KEY
from taskray.store import Store
from tests import sdk_functions as fns
from tests.ray_support import local_ray, running_scheduler, wait_for
from tests.test_api import serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('remote') / 'tasks.db'}"
    store = Store.open(url)
    _, secret = store.create_key("acme", "notebook", ["submit", "read"])
    _, admin = store.create_key("acme", "ops", ["admin"])
    with local_ray(num_cpus=4), running_scheduler(store, url):
        for api_url in serve(Settings(database_url=url)):
            taskray.init(url=api_url, api_key=secret)
            try:
                yield {"store": store, "url": api_url, "secret": secret, "admin": admin}
            finally:
                taskray.shutdown()
    store.close()


def test_submit_get_and_a_dag_over_http(remote: dict[str, Any]) -> None:
    a = fns.add.submit(1, 2)
    b = fns.add.submit(a, 10)
    c = fns.add.submit(a, 100)
    total = fns.total.submit([b, c], extra={"c": c})
    assert taskray.get(total, timeout=60) == 13 + 103 + 103
    assert taskray.get([a, b], timeout=60) == [3, 13]
    stored = remote["store"].get(total.id)
    assert stored.tenant == "acme"  # the key's tenant, not the client's say
    assert set(remote["store"].upstreams(total.id)) == {b.id, c.id}
    ready, _ = taskray.wait([a, b, c], num_returns=3, timeout=10)
    assert len(ready) == 3


def request_counts(remote: dict[str, Any]) -> dict[tuple[str, str], float]:
    """Requests the API served so far, by method and route, from its metrics."""
    with httpx.Client(
        base_url=remote["url"], headers={"Authorization": f"Bearer {remote['admin']}"}
    ) as client:
        text = client.get("/metrics").text
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "taskray_api_requests_total":
                key = (sample.labels["method"], sample.labels["route"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def test_get_and_wait_on_many_handles_use_the_wait_endpoint(remote: dict[str, Any]) -> None:
    handles = fns.total.map([[i, 1] for i in range(150)], progress=False)
    before = request_counts(remote)
    assert taskray.get(handles, timeout=120) == [i + 1 for i in range(150)]
    ready, not_ready = taskray.wait(handles, num_returns=100, timeout=10)
    assert len(ready) == 100 and len(not_ready) == 50
    slow = fns.nap.submit(60)
    ready, not_ready = taskray.wait([slow, handles[0]], num_returns=2, timeout=0.5)
    assert ready == [handles[0]] and not_ready == [slow]
    with pytest.raises(taskray.GetTimeoutError):
        taskray.get(slow, timeout=0.2)
    after = request_counts(remote)
    slow.cancel()
    seen = {key: after[key] - before.get(key, 0.0) for key in after}
    assert seen.get(("POST", "/v1/tasks/wait"), 0) >= 4
    assert seen.get(("GET", "/v1/tasks/{task_id}"), 0) == 0  # no read per handle


def test_failures_carry_the_remote_traceback_over_http(remote: dict[str, Any]) -> None:
    handle = fns.explode.submit("no space left")
    with pytest.raises(taskray.TaskFailedError) as caught:
        taskray.get(handle, timeout=60)
    assert caught.value.status == "dead"
    assert caught.value.remote_traceback and "no space left" in caught.value.remote_traceback


def test_what_http_cannot_carry_is_refused_before_sending(remote: dict[str, Any]) -> None:
    def local_function(x: int) -> int:
        return x

    with pytest.raises(taskray.InvalidTaskError, match="module the workers have"):
        taskray.task(local_function).submit(1)
    with pytest.raises(taskray.InvalidTaskError, match="JSON"):
        fns.add.submit(object(), 1)
    with pytest.raises(taskray.InvalidTaskError):
        fns.add.options(priority=-1).submit(1, 2)


def test_cancel_over_http(remote: dict[str, Any]) -> None:
    handle = fns.nap.submit(60)
    wait_for(lambda: handle.status() is TaskState.RUNNING, timeout_s=60)
    assert handle.cancel() is TaskState.CANCELLED


def test_a_bad_key_is_refused_at_init(remote: dict[str, Any]) -> None:
    taskray.shutdown()
    try:
        with pytest.raises(taskray.TaskrayError) as caught:
            taskray.init(url=remote["url"], api_key="trk_not-a-key")
        assert "not-a-key" not in str(caught.value)
        with pytest.raises(taskray.RemoteModeUnavailableError):
            taskray.init(url=remote["url"])
    finally:
        taskray.init(url=remote["url"], api_key=remote["secret"])


def test_a_payload_cannot_read_a_task_that_is_not_its_upstream(remote: dict[str, Any]) -> None:
    store: Store = remote["store"]
    secret = fns.add.submit(40, 2)
    assert taskray.get(secret, timeout=60) == 42
    # Another tenant names that task in its arguments without depending on it.
    thief = store.submit(
        TaskSpec(
            "tests.sdk_functions:add",
            payload={"args": [{UPSTREAM_KEY: str(secret.id)}, 0]},
            tenant="globex",
        )
    ).task
    wait_for(lambda: store.get(thief.id).status.is_terminal, timeout_s=60)
    stolen = store.get(thief.id)
    assert stolen.status is TaskState.DEAD and stolen.result is None
    assert "not an upstream" in (stolen.last_error or "")
