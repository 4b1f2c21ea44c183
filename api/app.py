"""The app factory: ``create_app(settings)``; ``api.app:app`` for ASGI servers reads the
settings from ``TASKRAY_*`` environment variables."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api import problems
from api.limits import BodyLimitMiddleware
from api.metrics import Metrics, MetricsMiddleware
from api.routers import dead_letter, health, queues, tasks
from api.settings import Settings
from taskray.registry import TaskRegistry
from taskray.store import Store


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Refuses to serve with a task module that cannot be imported: a typo in the
        # setting would otherwise refuse every task of that module.
        app.state.registry.load_all()
        # Refuses to serve a database whose schema is not at head: run `taskray db upgrade`.
        store = Store.open(
            settings.database_url, migrate=False, max_payload_bytes=settings.max_payload_bytes
        )
        app.state.store = store
        try:
            yield
        finally:
            store.close()

    app = FastAPI(
        title="taskray",
        version="1",
        summary="Submit, inspect, cancel and dead-letter tasks of a taskray scheduler.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = TaskRegistry(settings.task_modules)
    app.state.metrics = Metrics()
    problems.install(app)
    for router in (tasks.router, dead_letter.router, queues.router, health.router):
        app.include_router(router)
    # Outermost first: metrics see every response, including a refused body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


def __getattr__(name: str) -> Any:
    # `uvicorn api.app:app` builds the app on first access, so importing this module
    # (tests, tools) needs no environment.
    if name == "app":
        return create_app(Settings())
    raise AttributeError(name)
