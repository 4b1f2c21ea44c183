"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import Admin, StoreDep
from api.metrics import Metrics
from api.problems import responses
from api.schemas import Health, Readiness
from taskray.errors import TaskrayError
from taskray.store.engine import check_schema

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Database reachable, schema at head, a scheduler leading",
    responses={503: {"model": Readiness, "description": "Not ready; the checks say why"}},
)
def readyz(store: StoreDep) -> Response:
    checks: dict[str, str] = {}
    try:
        store.now()
        checks["database"] = "ok"
    except TaskrayError as exc:
        checks["database"] = exc.message
    if checks["database"] == "ok":
        try:
            check_schema(store.engine)
            checks["schema"] = "ok"
        except TaskrayError as exc:
            checks["schema"] = exc.message
        try:
            leader = store.leadership()
            checks["scheduler"] = "ok" if leader else "no scheduler holds the leader lease"
        except TaskrayError as exc:
            checks["scheduler"] = exc.message
    ready = bool(checks) and all(v == "ok" for v in checks.values()) and len(checks) == 3
    body = Readiness(status="ready" if ready else "not ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (admin: task counts span every tenant)",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
        **responses(401, 403, 503),
    },
)
def metrics(request: Request, _principal: Admin, store: StoreDep) -> Response:
    registry: Metrics = request.app.state.metrics
    registry.observe_tasks(store.count_by_status())
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
