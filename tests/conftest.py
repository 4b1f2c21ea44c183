"""Shared fixtures: one store per test on each backend.

PostgreSQL tests get a database of their own, copied from a template that was
migrated once per session (a copy costs ~30 ms; migrating costs more), and
dropped afterwards. Without a reachable server they skip, except under
``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

# Ray reads these when it is imported, so they are set before any test module imports it:
# traffic stays on loopback, its files in a temporary directory, and token auth uses a
# random token of this run (nothing lands in the home directory).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="taskray-ray-"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The test deployment's task modules: only their marked functions run by name. Set before
# any Ray starts, so that every Ray worker (each inherits this environment) and every API
# server of the session reads the same list.
os.environ["TASKRAY_TASK_MODULES"] = "tests.handlers,tests.sdk_functions,tests.faults.handlers"

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from taskray.store import Store, create_engine, migrate
from taskray.testing import FakeClock

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BACKENDS = ["sqlite", "postgresql"]


class PostgresServer:
    """Creates and drops uniquely named databases on the test server."""

    def __init__(self, admin_url: URL) -> None:
        self.admin_url = admin_url
        self.admin = sa.create_engine(
            admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
        )
        self.template: str | None = None
        self.created: list[str] = []

    def url(self, database: str) -> str:
        return self.admin_url.set(database=database).render_as_string(hide_password=False)

    def _execute(self, sql: str) -> None:
        with self.admin.connect() as connection:
            connection.exec_driver_sql(sql)

    def create(self, *, migrated: bool = True) -> str:
        if migrated and self.template is None:
            self.template = f"taskray_tpl_{uuid.uuid4().hex[:12]}"
            self._execute(f'CREATE DATABASE "{self.template}"')
            self.created.append(self.template)
            engine = create_engine(self.url(self.template), poolclass=sa.NullPool)
            migrate(engine)
            engine.dispose()
        name = f"taskray_test_{uuid.uuid4().hex[:12]}"
        template = f' TEMPLATE "{self.template}"' if migrated else ""
        self._execute(f'CREATE DATABASE "{name}"{template}')
        self.created.append(name)
        return self.url(name)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.created:
            self.created.remove(name)

    def close(self) -> None:
        for name in reversed(self.created):
            self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.admin.dispose()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    raw = os.environ.get("TASKRAY_TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
    admin_url = make_url(raw)
    if admin_url.drivername in ("postgresql", "postgres"):
        admin_url = admin_url.set(drivername="postgresql+psycopg")
    server = PostgresServer(admin_url)
    try:
        with server.admin.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except sa.exc.OperationalError:
        message = f"PostgreSQL is not reachable at {admin_url.render_as_string(hide_password=True)}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (required under CI=true)")
        pytest.skip(message)
    yield server
    server.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated database on ``backend``."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'taskray.db'}"
        engine = create_engine(url)
        migrate(engine)
        engine.dispose()
        yield url
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.create()
    yield url
    server.drop(url)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_store(database_url: str) -> Iterator[Callable[..., Store]]:
    """Opens stores on the test database; all are closed at the end of the test."""
    opened: list[Store] = []

    def factory(**options: object) -> Store:
        store = Store.open(database_url, migrate=False, **options)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: Callable[..., Store], clock: FakeClock) -> Store:
    """A store on a fresh database whose time is ``clock``'s."""
    return make_store(clock=clock)
