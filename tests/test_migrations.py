"""The migrations build exactly the schema the tables declare, on both backends."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from taskray.errors import MigrationError, StoreUnavailableError
from taskray.store import Store, create_engine, migrate
from taskray.store.engine import check_schema, current_revision, head_revision, redacted
from taskray.store.tables import metadata, tasks


@pytest.fixture
def empty_database_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    server = request.getfixturevalue("postgres")
    url = server.create(migrated=False)
    yield url
    server.drop(url)


def test_migrated_schema_matches_the_tables(empty_database_url: str) -> None:
    engine = create_engine(empty_database_url)
    try:
        with pytest.raises(MigrationError):
            check_schema(engine)
        migrate(engine)
        migrate(engine)  # a second run is a no-op
        assert current_revision(engine) == head_revision()
        check_schema(engine)
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), metadata)
            inspector = sa.inspect(connection)
            indexes = {ix["name"] for ix in inspector.get_indexes("tasks")}
        if engine.dialect.name == "sqlite":
            # Alembic cannot reflect SQLite's expression index ("priority DESC"), so it
            # reports that index as differing; its existence is checked below instead.
            diff = [d for d in diff if getattr(d[1], "name", None) != "ix_tasks_ready"]
        assert diff == []
        assert {
            "ix_tasks_ready",
            "ix_tasks_live_expiry",
            "uq_tasks_tenant_idempotency_key",
        } <= indexes
    finally:
        engine.dispose()


def test_opening_an_unmigrated_database_without_migrate_refuses(empty_database_url: str) -> None:
    with pytest.raises(MigrationError, match="taskray db upgrade"):
        Store.open(empty_database_url, migrate=False)
    with Store.open(empty_database_url) as store:
        assert store.count_by_status() == {}


def test_unreachable_database_error_hides_the_password() -> None:
    url = "postgresql://ana:s3cret-pw@127.0.0.1:1/taskray"
    with pytest.raises(StoreUnavailableError) as caught:
        Store.open(url, engine_options={"connect_args": {"connect_timeout": 2}})
    assert "s3cret-pw" not in str(caught.value)
    assert "***" in redacted(url) and "s3cret-pw" not in redacted(url)


def test_schema_revision_constant_is_the_migrations_head() -> None:
    # Processes check the schema against the constant without reading the scripts.
    from taskray.store.engine import SCHEMA_REVISION

    assert head_revision() == SCHEMA_REVISION


def test_encoding_is_backfilled_from_what_only_the_python_client_wrote(
    empty_database_url: str,
) -> None:
    # Before revision 0004 only a Python client holding the database wrote a pickle (a
    # one-key object) as a whole payload; the API refused one. Everything else is JSON,
    # pickle-shaped values nested inside it included.
    engine = create_engine(empty_database_url)
    payloads = {
        "pickled": {"__taskray_pickle__": "gASVAAAAAAAAAAA="},
        "nested": {"kwargs": {"v": {"__taskray_pickle__": "gASVAAAAAAAAAAA="}}},
        "two keys": {"__taskray_pickle__": "gASV", "other": 1},
        "not a string": {"__taskray_pickle__": 1},
        "plain": [1, 2],
        "none": None,
    }
    try:
        migrate(engine, "0003")
        with engine.begin() as connection:
            # The table as revision 0003 left it: today's columns but the new one.
            before = sa.Table(
                "tasks",
                sa.MetaData(),
                *(sa.Column(c.name, c.type) for c in tasks.columns if c.name != "encoding"),
            )
            now = datetime.now(UTC)
            for name, payload in payloads.items():
                connection.execute(
                    sa.insert(before).values(
                        id=uuid.uuid4(),
                        tenant="t",
                        queue="q",
                        type=name,
                        payload=payload,
                        status="queued",
                        priority=0,
                        attempt=0,
                        max_retries=3,
                        replayed_attempts=0,
                        backoff_base_s=1.0,
                        backoff_cap_s=300.0,
                        backoff_jitter=0.5,
                        num_cpus=1.0,
                        num_gpus=0.0,
                        memory_bytes=0,
                        pending_upstreams=0,
                        created_at=now,
                        scheduled_at=now,
                    )
                )
        migrate(engine)
        with engine.connect() as connection:
            encodings = dict(connection.execute(sa.select(tasks.c.type, tasks.c.encoding)).all())
    finally:
        engine.dispose()
    assert encodings == {name: "pickle" if name == "pickled" else "json" for name in payloads}
