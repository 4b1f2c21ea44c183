"""Queue statistics of the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import Reader, StoreDep
from api.problems import responses
from api.schemas import QueueStatsPublic

router = APIRouter(prefix="/v1/queues", tags=["queues"], responses=responses(401, 403, 422, 503))

Window = Annotated[float, Query(gt=0, le=7 * 86400, description="Seconds of throughput")]


@router.get("", response_model=list[QueueStatsPublic], summary="Every queue's depth and flow")
def list_queues(
    principal: Reader, store: StoreDep, window_s: Window = 300.0
) -> list[QueueStatsPublic]:
    return [
        QueueStatsPublic.of(s)
        for s in store.queue_stats(tenant=principal.tenant, window_s=window_s)
    ]


@router.get(
    "/{queue}",
    response_model=QueueStatsPublic,
    summary="One queue's depth and flow (empty when it holds nothing)",
)
def get_queue(
    queue: str, principal: Reader, store: StoreDep, window_s: Window = 300.0
) -> QueueStatsPublic:
    found = store.queue_stats(tenant=principal.tenant, queue=queue, window_s=window_s)
    if not found:
        return QueueStatsPublic(
            queue=queue,
            by_state={},
            depth=[],
            oldest_ready_age_s=None,
            finished_in_window={},
            window_s=window_s,
        )
    return QueueStatsPublic.of(found[0])
