"""Tasks: submit (one or a batch/DAG), read, list, cancel."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import time
import uuid
from datetime import datetime
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request, Response, status
from pydantic import AwareDatetime

from api.deps import Reader, RegistryDep, SettingsDep, StoreDep, Submitter
from api.problems import responses
from api.schemas import (
    AttemptPublic,
    BatchSubmitted,
    TaskBatchCreate,
    TaskCreate,
    TaskDetail,
    TaskPage,
    TaskPublic,
    TasksFinished,
    TaskSubmitted,
    TaskWait,
)
from taskray.errors import (
    InvalidArgumentError,
    InvalidTaskError,
    UnknownTaskError,
    UnregisteredTaskTypeError,
)
from taskray.models import SubmitResult, TaskSpec, TaskState
from taskray.registry import TaskRegistry
from taskray.sdk.handles import wait_terminal
from taskray.store import Store

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], responses=responses(401, 403, 422, 503))


def _submit(store: Store, specs: list[TaskSpec]) -> list[SubmitResult]:
    try:
        return store.submit_many(specs)
    except UnknownTaskError as exc:
        # On submit an unknown id is a dependency the caller got wrong, not a missing resource.
        raise InvalidTaskError(
            "unknown dependency: " + ", ".join(exc.task_ids), task_ids=exc.task_ids
        ) from None


def _check_registered(registry: TaskRegistry, tasks: list[TaskCreate]) -> None:
    """Refuse the request, before anything is written, if any task's type is not one the
    deployment registered: a task type names code the workers would run."""
    for index, task in enumerate(tasks):
        try:
            registry.resolve(task.type)
        except UnregisteredTaskTypeError as exc:
            where = f"tasks[{index}]: " if len(tasks) > 1 else ""
            raise UnregisteredTaskTypeError(where + exc.message) from None


def _submitted(result: SubmitResult) -> TaskSubmitted:
    return TaskSubmitted(**TaskPublic.fields_of(result.task), deduplicated=result.deduplicated)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskSubmitted,
    summary="Submit one task",
    responses={
        200: {"model": TaskSubmitted, "description": "Deduplicated: the first task"},
        **responses(400, 413),
    },
)
def submit_task(
    body: TaskCreate,
    principal: Submitter,
    store: StoreDep,
    registry: RegistryDep,
    response: Response,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
    ] = None,
) -> TaskSubmitted:
    if idempotency_key and body.idempotency_key and idempotency_key != body.idempotency_key:
        raise InvalidArgumentError("the Idempotency-Key header and field disagree")
    if body.key is not None:
        raise InvalidArgumentError("key names a task within a batch; submit a batch to use it")
    _check_registered(registry, [body])
    result = _submit(store, [body.to_spec(principal.tenant, idempotency_key)])[0]
    if result.deduplicated:
        response.status_code = status.HTTP_200_OK
    return _submitted(result)


@router.post(
    "/batch",
    status_code=status.HTTP_201_CREATED,
    response_model=BatchSubmitted,
    summary="Submit a batch or a DAG in one transaction",
    responses={
        200: {"model": BatchSubmitted, "description": "Every task was a repeat"},
        **responses(400, 413),
    },
)
def submit_batch(
    body: TaskBatchCreate,
    principal: Submitter,
    store: StoreDep,
    registry: RegistryDep,
    settings: SettingsDep,
    response: Response,
) -> BatchSubmitted:
    if len(body.tasks) > settings.max_batch_size:
        raise InvalidArgumentError(
            f"a batch holds at most {settings.max_batch_size} tasks, got {len(body.tasks)}"
        )
    _check_registered(registry, body.tasks)
    results = _submit(store, [t.to_spec(principal.tenant) for t in body.tasks])
    created = sum(1 for r in results if not r.deduplicated)
    if created == 0:
        response.status_code = status.HTTP_200_OK
    return BatchSubmitted(
        tasks=[_submitted(r) for r in results],
        keys={t.key: r.task.id for t, r in zip(body.tasks, results, strict=True) if t.key},
        created=created,
        deduplicated=len(results) - created,
    )


def _encode_cursor(created_at: datetime, task_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(task_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, task_id = json.loads(raw)
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("naive")
        return when, uuid.UUID(task_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgumentError("cursor is not one this API returned") from None


def _labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"label filter must be key=value, got {pair!r}")
        labels[key] = value
    return labels


@router.get(
    "",
    response_model=TaskPage,
    summary="List tasks, oldest first, a page at a time",
    responses=responses(400),
)
def list_tasks(
    principal: Reader,
    store: StoreDep,
    status_: Annotated[TaskState | None, Query(alias="status")] = None,
    queue: Annotated[str | None, Query(max_length=200)] = None,
    type_: Annotated[str | None, Query(alias="type", max_length=200)] = None,
    label: Annotated[
        list[str], Query(description="key=value; repeat to require several", max_length=20)
    ] = [],  # noqa: B006 - FastAPI copies query defaults per request
    created_from: AwareDatetime | None = None,
    created_before: AwareDatetime | None = None,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> TaskPage:
    found = store.list_tasks(
        tenant=principal.tenant,
        queue=queue,
        status=status_,
        task_type=type_,
        labels=_labels(label),
        created_from=created_from,
        created_before=created_before,
        after=None if cursor is None else _decode_cursor(cursor),
        limit=limit + 1,
    )
    page = found[:limit]
    more = len(found) > limit
    return TaskPage(
        tasks=[TaskPublic.of(t) for t in page],
        next_cursor=_encode_cursor(page[-1].created_at, page[-1].id) if more else None,
    )


#: Wait requests held at once per app; each holds a thread and, on PostgreSQL, a LISTEN
#: connection. More queue for a token (their deadline still counts from their arrival).
MAX_CONCURRENT_WAITS = 32


def _wait_limiter(request: Request) -> anyio.CapacityLimiter:
    # Waits get threads of their own: held for up to a minute, they must not take the
    # thread pool that every other sync endpoint and the key check run on.
    state = request.app.state
    limiter: anyio.CapacityLimiter | None = getattr(state, "wait_limiter", None)
    if limiter is None:  # the event loop runs this without a switch: one limiter per app
        limiter = anyio.CapacityLimiter(MAX_CONCURRENT_WAITS)
        state.wait_limiter = limiter
    return limiter


@router.post(
    "/wait",
    response_model=TasksFinished,
    summary="Wait until tasks finish (long poll)",
    description=(
        "Answers once `num_returns` of `ids` (default: all) are terminal, or after "
        "`timeout` seconds (default 10, at most 60), with the terminal ones. Woken by "
        "completions, not by polling each task. A task of another tenant is unknown (404)."
    ),
    responses={
        200: {"description": "The terminal tasks among those asked"},
        **responses(400, 404, 413),
    },
)
async def wait_tasks(
    body: TaskWait, principal: Reader, store: StoreDep, request: Request
) -> TasksFinished:
    deadline = time.monotonic() + body.timeout
    ids = list(dict.fromkeys(body.ids))
    num_returns = len(ids) if body.num_returns is None else body.num_returns
    if num_returns > len(ids):
        raise InvalidArgumentError(
            f"num_returns must be within 0..{len(ids)} (the distinct ids), got {num_returns}"
        )
    wait = functools.partial(
        wait_terminal, store, ids, num_returns, deadline, tenant=principal.tenant
    )
    done = await anyio.to_thread.run_sync(wait, limiter=_wait_limiter(request))
    return TasksFinished(
        tasks=[TaskPublic.of(done[i]) for i in ids if i in done],
        pending=sum(1 for i in ids if i not in done),
    )


@router.get(
    "/{task_id}",
    response_model=TaskDetail,
    summary="Get a task with its attempts",
    responses=responses(404),
)
def get_task(task_id: uuid.UUID, principal: Reader, store: StoreDep) -> TaskDetail:
    task = store.get(task_id, tenant=principal.tenant)
    attempts = store.attempts(task_id, tenant=principal.tenant)
    return TaskDetail(
        **TaskPublic.fields_of(task), attempts=[AttemptPublic.of(a) for a in attempts]
    )


@router.get(
    "/{task_id}/attempts",
    response_model=list[AttemptPublic],
    summary="The attempts of a task",
    responses=responses(404),
)
def get_attempts(task_id: uuid.UUID, principal: Reader, store: StoreDep) -> list[AttemptPublic]:
    return [AttemptPublic.of(a) for a in store.attempts(task_id, tenant=principal.tenant)]


@router.post(
    "/{task_id}/cancel",
    response_model=TaskPublic,
    summary="Cancel a task; a running one loses its lease and is stopped",
    responses=responses(404, 409),
)
def cancel_task(task_id: uuid.UUID, principal: Submitter, store: StoreDep) -> TaskPublic:
    return TaskPublic.of(store.cancel(task_id, tenant=principal.tenant, reason="cancelled via API"))
