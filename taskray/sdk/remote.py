"""Remote mode: the SDK's calls over the taskray REST API instead of the database.

``taskray.init(url=..., api_key=...)`` swaps the store for this client. It offers
the same operations the SDK uses, so handles, ``get`` and ``wait`` work
unchanged. Over HTTP everything is JSON: tasks are submitted by name (workers
import them), arguments must be JSON, and an upstream handle among them
travels as a marker the worker replaces with that task's result.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import httpx

from taskray.errors import (
    AuthenticationError,
    InvalidStateError,
    InvalidTaskError,
    PayloadTooLargeError,
    PermissionDeniedError,
    StoreUnavailableError,
    TaskrayError,
    UnknownTaskError,
)
from taskray.models import (
    Attempt,
    AttemptOutcome,
    Encoding,
    Resources,
    RetryPolicy,
    SubmitResult,
    Task,
    TaskSpec,
    TaskState,
)

_ERRORS: dict[int, type[TaskrayError]] = {
    400: InvalidTaskError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: UnknownTaskError,
    409: InvalidStateError,
    413: PayloadTooLargeError,
    422: InvalidTaskError,
}


def _when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _task(data: dict[str, Any], tenant: str = "") -> Task:
    resources = data["resources"]
    return Task(
        id=uuid.UUID(data["id"]),
        tenant=tenant,
        queue=data["queue"],
        type=data["type"],
        payload=data["payload"],
        status=TaskState(data["status"]),
        priority=data["priority"],
        attempt=data["attempt"],
        retry=RetryPolicy(max_retries=data["max_retries"]),
        timeout_s=data["timeout_s"],
        resources=Resources(
            num_cpus=resources["num_cpus"],
            num_gpus=resources["num_gpus"],
            memory=resources["memory"],
            custom=resources.get("custom") or {},
        ),
        created_at=datetime.fromisoformat(data["created_at"]),
        scheduled_at=datetime.fromisoformat(data["scheduled_at"]),
        leased_at=_when(data["leased_at"]),
        started_at=_when(data["started_at"]),
        completed_at=_when(data["completed_at"]),
        lease_id=None,
        lease_expires_at=_when(data["lease_expires_at"]),
        epoch=None,
        node_id=data["node_id"],
        pending_upstreams=data["pending_upstreams"],
        idempotency_key=data["idempotency_key"],
        result=data["result"],
        last_error=data["last_error"],
        labels=data["labels"],
        metadata=data["metadata"],
        encoding=Encoding(data.get("encoding", Encoding.JSON)),
    )


def _attempt(task_id: uuid.UUID, data: dict[str, Any]) -> Attempt:
    return Attempt(
        task_id=task_id,
        attempt=data["attempt"],
        lease_id=uuid.UUID(data["lease_id"]),
        node_id=data["node_id"],
        worker_id=data["worker_id"],
        leased_at=datetime.fromisoformat(data["leased_at"]),
        started_at=_when(data["started_at"]),
        finished_at=_when(data["finished_at"]),
        outcome=None if data["outcome"] is None else AttemptOutcome(data["outcome"]),
        error=data["error"],
        traceback=data["traceback"],
    )


def _spec_json(spec: TaskSpec) -> dict[str, Any]:
    document: dict[str, Any] = {
        "type": spec.type,
        "payload": spec.payload,
        "queue": spec.queue,
        "priority": spec.priority,
        "delay_s": spec.delay_s,
        "timeout_s": spec.timeout_s,
        "max_retries": spec.retry.max_retries,
        "backoff": {
            "base_s": spec.retry.backoff_base_s,
            "cap_s": spec.retry.backoff_cap_s,
            "jitter": spec.retry.jitter,
        },
        "resources": {
            "num_cpus": spec.resources.num_cpus,
            "num_gpus": spec.resources.num_gpus,
            "memory": spec.resources.memory,
            "custom": dict(spec.resources.custom),
        },
        "depends_on": [str(d) for d in spec.depends_on],
        "labels": dict(spec.labels),
        "metadata": dict(spec.metadata),
    }
    if spec.scheduled_at is not None:
        document["scheduled_at"] = spec.scheduled_at.isoformat()
    for name in ("idempotency_key", "key"):
        if getattr(spec, name) is not None:
            document[name] = getattr(spec, name)
    return document


class RemoteBackend:
    """The operations the SDK needs, over HTTP with a bearer API key."""

    is_remote = True

    def __init__(self, url: str, api_key: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
        )

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise StoreUnavailableError(
                f"cannot reach the taskray API at {self.url} ({type(exc).__name__})"
            ) from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail") or response.json().get("title")
            except ValueError:
                detail = response.reason_phrase
            error = _ERRORS.get(response.status_code)
            if error is None:
                raise StoreUnavailableError(f"the taskray API answered {response.status_code}")
            if error is UnknownTaskError:
                raise UnknownTaskError([detail or path])
            raise error(str(detail))
        return response.json()

    def check(self) -> None:
        """Fail early on a bad key or a wrong URL."""
        self._call("GET", "/v1/tasks", params={"limit": 1})

    def submit_many(self, specs: Iterable[TaskSpec]) -> list[SubmitResult]:
        batch = [_spec_json(s) for s in specs]
        if not batch:
            return []
        body = self._call("POST", "/v1/tasks/batch", json={"tasks": batch})
        return [SubmitResult(_task(t), bool(t["deduplicated"])) for t in body["tasks"]]

    def get(self, task_id: uuid.UUID | str) -> Task:
        return _task(self._call("GET", f"/v1/tasks/{task_id}"))

    def get_many(self, task_ids: Iterable[uuid.UUID | str]) -> list[Task]:
        return [self.get(t) for t in task_ids]

    def wait(
        self, task_ids: Sequence[uuid.UUID | str], *, num_returns: int, timeout_s: float
    ) -> list[Task]:
        """One long poll (``POST /v1/tasks/wait``): the tasks among ``task_ids`` that are
        terminal once ``num_returns`` of them are, or after ``timeout_s`` seconds (at most
        60)."""
        body = self._call(
            "POST",
            "/v1/tasks/wait",
            json={
                "ids": [str(t) for t in task_ids],
                "num_returns": num_returns,
                "timeout": timeout_s,
            },
            # The server holds the request for up to timeout_s: wait longer than that.
            timeout=max(self.timeout_s, timeout_s + self.timeout_s),
        )
        return [_task(t) for t in body["tasks"]]

    def attempts(self, task_id: uuid.UUID | str) -> list[Attempt]:
        rows = self._call("GET", f"/v1/tasks/{task_id}/attempts")
        return [_attempt(uuid.UUID(str(task_id)), row) for row in rows]

    def cancel(self, task_id: uuid.UUID | str) -> Task:
        return _task(self._call("POST", f"/v1/tasks/{task_id}/cancel"))

    def upstreams(self, task_id: uuid.UUID | str) -> Sequence[uuid.UUID]:
        raise InvalidTaskError("the DAG view needs a direct connection to the store")

    def put_function(self, digest: str, name: str, blob: bytes) -> None:
        raise InvalidTaskError(
            f"{name} is defined where workers cannot import it: over the REST API tasks are "
            "submitted by name, so define it in a module the workers have"
        )
