"""The dead-letter queue: inspect (read), replay and purge (admin)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import Admin, Reader, StoreDep
from api.problems import responses
from api.schemas import (
    AttemptPublic,
    DeadLetterPurge,
    DeadLetterReplay,
    Purged,
    Replayed,
    TaskDetail,
    TaskPublic,
)
from taskray.errors import UnknownTaskError
from taskray.models import TaskState

router = APIRouter(
    prefix="/v1/dead-letter", tags=["dead-letter"], responses=responses(401, 403, 422, 503)
)


@router.get("", response_model=list[TaskPublic], summary="Dead tasks, newest first")
def list_dead(
    principal: Reader,
    store: StoreDep,
    queue: Annotated[str | None, Query(max_length=200)] = None,
    type_: Annotated[str | None, Query(alias="type", max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[TaskPublic]:
    dead = store.list_dead(tenant=principal.tenant, queue=queue, task_type=type_, limit=limit)
    return [TaskPublic.of(t) for t in dead]


@router.get(
    "/{task_id}",
    response_model=TaskDetail,
    summary="A dead task with its attempts",
    responses=responses(404),
)
def get_dead(task_id: uuid.UUID, principal: Reader, store: StoreDep) -> TaskDetail:
    task = store.get(task_id, tenant=principal.tenant)
    if task.status is not TaskState.DEAD:
        # Only dead tasks live in the dead-letter queue; this one is not there.
        raise UnknownTaskError([task_id])
    attempts = store.attempts(task_id, tenant=principal.tenant)
    return TaskDetail(
        **TaskPublic.fields_of(task), attempts=[AttemptPublic.of(a) for a in attempts]
    )


@router.post(
    "/{task_id}/replay",
    response_model=TaskPublic,
    summary="Put one dead task back in the queue with a fresh retry budget",
    responses=responses(404, 409),
)
def replay_one(task_id: uuid.UUID, principal: Admin, store: StoreDep) -> TaskPublic:
    return TaskPublic.of(store.replay([task_id], tenant=principal.tenant)[0])


@router.post("/replay", response_model=Replayed, summary="Replay every dead task matching a filter")
def replay_matching(body: DeadLetterReplay, principal: Admin, store: StoreDep) -> Replayed:
    replayed = store.replay(tenant=principal.tenant, queue=body.queue, task_type=body.type)
    return Replayed(replayed=len(replayed), task_ids=[t.id for t in replayed])


@router.post("/purge", response_model=Purged, summary="Delete dead tasks for good")
def purge(body: DeadLetterPurge, principal: Admin, store: StoreDep) -> Purged:
    count = store.purge(
        body.task_ids,
        tenant=principal.tenant,
        queue=body.queue,
        task_type=body.type,
        older_than=body.older_than,
    )
    return Purged(purged=count)
