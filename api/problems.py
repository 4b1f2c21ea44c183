"""RFC 9457 problem details: every error the API returns, mapped from taskray's errors here
and nowhere else."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from taskray.errors import (
    AuthenticationError,
    CycleError,
    InvalidArgumentError,
    InvalidStateError,
    InvalidTaskError,
    LeaseLostError,
    MigrationError,
    NotLeaderError,
    PayloadTooLargeError,
    PermissionDeniedError,
    StoreUnavailableError,
    TaskrayError,
    UnknownTaskError,
    UnregisteredTaskTypeError,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://taskray.dev/problems/"

#: Most specific first: the first class an error is an instance of decides its status.
STATUS_BY_ERROR: list[tuple[type[TaskrayError], int, str]] = [
    (AuthenticationError, 401, "unauthenticated"),
    (PermissionDeniedError, 403, "forbidden"),
    (PayloadTooLargeError, 413, "payload-too-large"),
    (CycleError, 422, "dependency-cycle"),
    (UnregisteredTaskTypeError, 422, "unregistered-task-type"),
    (InvalidTaskError, 422, "invalid-task"),
    (InvalidArgumentError, 400, "invalid-argument"),
    (UnknownTaskError, 404, "not-found"),
    (InvalidStateError, 409, "conflicting-state"),
    (LeaseLostError, 409, "lease-lost"),
    (NotLeaderError, 409, "not-leader"),
    (StoreUnavailableError, 503, "store-unavailable"),
    (MigrationError, 503, "schema-out-of-date"),
]

TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    422: "Unprocessable content",
    500: "Internal server error",
    503: "Service unavailable",
}


class Problem(BaseModel):
    """An RFC 9457 problem; some carry extra members (``cycle``, ``errors``)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": TYPE_BASE + "dependency-cycle",
                    "title": "Unprocessable content",
                    "status": 422,
                    "detail": "dependency cycle: a -> b -> a",
                    "cycle": ["a", "b", "a"],
                }
            ]
        },
    )

    type: str
    title: str
    status: int
    detail: str


def _problem_content(status: int) -> dict[str, Any]:
    return {
        "model": Problem,
        "description": TITLES.get(status, "Error"),
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problems a route can return."""
    return {status: _problem_content(status) for status in statuses}


def problem_response(
    status: int, slug: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {
        "type": TYPE_BASE + slug,
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def from_error(exc: TaskrayError) -> JSONResponse:
    status, slug = next(
        ((code, name) for cls, code, name in STATUS_BY_ERROR if isinstance(exc, cls)),
        (400, "invalid-request"),
    )
    extra: dict[str, Any] = {}
    headers = None
    if isinstance(exc, CycleError):
        extra["cycle"] = exc.cycle
    if isinstance(exc, AuthenticationError):
        headers = {"WWW-Authenticate": "Bearer"}
    return problem_response(status, slug, exc.message, headers, **extra)


async def _taskray_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TaskrayError)
    return from_error(exc)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # The offending input is left out: it can be large, and echoing it serves nobody.
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    return problem_response(
        422, "validation", f"{where}: {first['msg']}", errors=jsonable_encoder(errors)
    )


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else TITLES.get(exc.status_code, "Error")
    return problem_response(exc.status_code, "http", detail, dict(exc.headers or {}) or None)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    # Logged with its traceback for operators; the caller learns nothing internal.
    log.exception("unhandled error", exc_info=exc)
    return problem_response(500, "internal", "internal server error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(TaskrayError, _taskray_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
