"""The Python SDK in embedded mode: a local Ray, SQLite, the scheduler actor."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import ray
import sqlalchemy as sa

import taskray
from taskray.models import TaskState
from taskray.sdk import runtime
from tests import sdk_functions as fns
from tests.ray_support import RUNTIME_ENV, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[runtime.Runtime]:
    url = f"sqlite:///{tmp_path_factory.mktemp('sdk') / 'tasks.db'}"
    started = taskray.init(url, num_cpus=4, num_gpus=1, runtime_env=RUNTIME_ENV)
    yield started
    taskray.shutdown()


def count_tasks(rt: runtime.Runtime) -> int:
    return sum(rt.store.count_by_status().values())


def test_init_is_idempotent_and_remote_mode_says_what_it_needs(embedded: runtime.Runtime) -> None:
    assert taskray.init() is embedded
    assert taskray.is_initialized()
    with pytest.raises(taskray.InvalidTaskError, match="already initialised"):
        taskray.init(url="http://127.0.0.1:8000", api_key="secret")


def test_submit_and_get(embedded: runtime.Runtime) -> None:
    handle = fns.add.submit(2, 3)
    assert taskray.get(handle, timeout=60) == 5
    assert handle.status() is TaskState.SUCCEEDED
    assert handle.result() == 5
    [attempt] = handle.attempts()
    assert attempt.outcome is not None and attempt.outcome.value == "succeeded"
    assert fns.add(1, 1) == 2  # a plain call still runs locally


def test_a_dag_passes_results_through_handles(embedded: runtime.Runtime) -> None:
    a = fns.add.submit(1, 2)
    b = fns.add.submit(a, 10)
    c = fns.add.submit(a, 100)
    d = fns.total.submit([b, c, 1000], extra={"c": c})
    gate = fns.add.submit(0, 0, after=[d])
    assert taskray.get(d, timeout=60) == 13 + 103 + 1000 + 103
    assert taskray.get(gate, timeout=60) == 0
    store = embedded.store
    assert set(store.upstreams(d.id)) == {b.id, c.id}
    assert store.upstreams(gate.id) == [d.id]
    assert [h.id for h in d.dag()][-1] == d.id and len(d.dag()) == 4
    assert "succeeded" in d.dag()._repr_html_()


def test_functions_defined_here_ship_by_value_once(embedded: runtime.Runtime) -> None:
    def make() -> taskray.TaskFunction:  # type: ignore[type-arg]
        @taskray.task(idempotency_key=lambda x: f"square-{x}")
        def square(x: int) -> int:
            return x * x

        return square

    first_cell, rerun_cell = make(), make()
    first = first_cell.submit(7)
    again = rerun_cell.submit(7)
    assert first.type.startswith("pickled:") and first.type == again.type
    assert again.deduplicated and again.id == first.id
    assert taskray.get(first, timeout=60) == 49
    # One copy, however often the cell runs (the table also holds the registrations of
    # importable functions other tests submitted).
    with embedded.store.engine.connect() as connection:
        functions = connection.execute(
            sa.text("SELECT count(*) FROM task_functions WHERE name LIKE '%.square'")
        ).scalar_one()
    assert functions == 1


def test_map_submits_in_bulk(embedded: runtime.Runtime) -> None:
    squares = taskray.task(lambda x: x * x)
    handles = squares.map(range(10), progress=True)
    assert isinstance(handles, taskray.HandleList) and len(handles) == 10
    assert taskray.get(handles, timeout=60) == [x * x for x in range(10)]
    ready, not_ready = taskray.wait(handles, num_returns=3, timeout=10)
    assert len(ready) == 3 and len(not_ready) == 7
    assert "<table>" in handles._repr_html_()


def test_get_and_wait_on_many_handles(embedded: runtime.Runtime) -> None:
    handles = fns.total.map([[i, i] for i in range(200)], progress=False)
    ready, not_ready = taskray.wait(handles, num_returns=50, timeout=120)
    assert len(ready) == 50 and len(not_ready) == 150
    assert set(ready).isdisjoint(not_ready) and set(ready) | set(not_ready) == set(handles)
    assert all(h.status().is_terminal for h in ready)
    assert taskray.get(handles, timeout=120, progress=True) == [2 * i for i in range(200)]
    # Repeats and a mix with one that fails: get names the failure; wait counts it finished.
    failing = fns.explode.options(max_retries=0).submit("one of many")
    with pytest.raises(taskray.TaskFailedError, match="one of many"):
        taskray.get([*handles[:10], failing, handles[0]], timeout=60)
    ready, not_ready = taskray.wait([*handles, failing], num_returns=201, timeout=10)
    assert len(ready) == 201 and not_ready == []


def test_submits_reuse_a_cached_view_of_the_cluster(
    embedded: runtime.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_nodes = ray.nodes

    def counted_nodes() -> list[dict[str, object]]:
        calls.append(1)
        return real_nodes()  # type: ignore[no-untyped-call, no-any-return]

    monkeypatch.setattr(ray, "nodes", counted_nodes)
    assert embedded.node_totals(max_age_s=0.0)  # a fresh view, for the next few seconds
    handles = [fns.add.submit(i, 1) for i in range(20)]
    assert len(calls) == 1
    # What does not fit the cached view is checked against a fresh one before the refusal.
    with pytest.raises(taskray.InvalidResourcesError, match="large enough"):
        fns.add.options(num_gpus=8).submit(1, 2)
    assert len(calls) == 2
    assert taskray.get(handles, timeout=60) == [i + 1 for i in range(20)]


def test_submit_by_name(embedded: runtime.Runtime) -> None:
    handle = taskray.submit("tests.sdk_functions:add", 20, b=22, options={"priority": 5})
    assert taskray.get(handle, timeout=60) == 42
    assert embedded.store.get(handle.id).priority == 5


def test_failure_carries_the_remote_traceback(embedded: runtime.Runtime) -> None:
    handle = fns.explode.submit("disk full")
    with pytest.raises(taskray.TaskFailedError) as caught:
        taskray.get(handle, timeout=60)
    error = caught.value
    assert error.status == "dead"
    assert "dead-lettered" in str(error)
    assert error.remote_traceback and "RuntimeError: disk full" in error.remote_traceback
    assert "explode" in error.remote_traceback
    assert len(handle.attempts()) == 3


def test_retry_on_limits_which_errors_retry(embedded: runtime.Runtime) -> None:
    handle = fns.wrong_kind_of_error.submit()
    with pytest.raises(taskray.TaskFailedError):
        taskray.get(handle, timeout=60)
    assert len(handle.attempts()) == 1


def test_a_gpu_task_gets_a_gpu(embedded: runtime.Runtime) -> None:
    assert taskray.get(fns.which_gpu.submit(), timeout=60) == "0"


def test_cancel_stops_a_running_task(embedded: runtime.Runtime) -> None:
    handle = fns.nap.submit(120)
    wait_for(lambda: handle.status() is TaskState.RUNNING, timeout_s=60)
    assert handle.cancel() is TaskState.CANCELLED
    with pytest.raises(taskray.TaskFailedError, match="cancelled"):
        taskray.get(handle, timeout=5)
    # The scheduler stopped the Ray task: nothing of ours is left running.
    scheduler = embedded.scheduler
    wait_for(lambda: ray.get(scheduler.status.remote())["in_flight"] == 0, timeout_s=30)


def test_get_times_out_and_wait_reports_what_is_left(embedded: runtime.Runtime) -> None:
    slow = fns.nap.submit(30)
    with pytest.raises(taskray.GetTimeoutError):
        taskray.get(slow, timeout=0.3)
    ready, not_ready = taskray.wait([slow], num_returns=1, timeout=0.2)
    assert ready == [] and not_ready == [slow]
    slow.cancel()


@pytest.mark.parametrize(
    ("make_call", "error"),
    [
        (
            lambda: fns.add.options(resources={"fpga": 1}).submit(1, 2),
            taskray.InvalidResourcesError,
        ),
        (lambda: fns.add.options(num_gpus=8).submit(1, 2), taskray.InvalidResourcesError),
        (lambda: fns.add.options(priority=-1).submit(1, 2), taskray.InvalidPriorityError),
        (lambda: fns.add.submit(threading.Lock(), 2), taskray.InvalidTaskError),
        (lambda: fns.add.options(memory="lots").submit(1, 2), taskray.InvalidResourcesError),
        (lambda: fns.add.options(timeout="soon").submit(1, 2), taskray.InvalidTaskError),
        (lambda: fns.add.options(no_such_option=1), taskray.InvalidTaskError),
        (lambda: fns.add.submit(b"x" * (2 << 20), 1), taskray.PayloadTooLargeError),
    ],
)
def test_bad_input_raises_a_typed_error_and_submits_nothing(
    embedded: runtime.Runtime, make_call: object, error: type[Exception]
) -> None:
    before = count_tasks(embedded)
    with pytest.raises(error):
        make_call()  # type: ignore[operator]
    assert count_tasks(embedded) == before


def test_an_oversized_result_fails_with_a_clear_error(embedded: runtime.Runtime) -> None:
    handle = fns.big_result.submit(2 << 20)
    with pytest.raises(taskray.TaskFailedError, match="limit"):
        taskray.get(handle, timeout=60)
    assert len(handle.attempts()) == 1  # retrying cannot make it smaller


def test_options_parse_human_units(embedded: runtime.Runtime) -> None:
    handle = fns.add.options(memory="256MiB", timeout="10m", delay="0.2s").submit(1, 1)
    task = embedded.store.get(handle.id)
    assert task.resources.memory == 256 << 20
    assert task.timeout_s == 600
    assert (task.scheduled_at - task.created_at).total_seconds() == pytest.approx(0.2)
    assert taskray.get(handle, timeout=60) == 2
