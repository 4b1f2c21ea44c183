"""Functions shipped by value: pickled by trusted SDK clients, stored once per digest."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from taskray.errors import UnknownTaskError
from taskray.store.base import StoreBase
from taskray.store.tables import task_functions


class FunctionsMixin(StoreBase):
    def put_function(self, digest: str, name: str, blob: bytes) -> None:
        """Store a pickled function once per content digest (re-running a notebook cell that
        defines the same function adds nothing)."""
        with self.transaction() as (connection, now):
            # The same INSERT ... ON CONFLICT DO NOTHING on both; SQLAlchemy spells it per dialect.
            insert = postgresql.insert if self.is_postgres else sqlite.insert
            connection.execute(
                insert(task_functions)
                .values(digest=digest, name=name[:200], blob=blob, created_at=now)
                .on_conflict_do_nothing()
            )

    def get_function(self, digest: str) -> bytes:
        with self.transaction() as (connection, _):
            blob = connection.execute(
                sa.select(task_functions.c.blob).where(task_functions.c.digest == digest)
            ).scalar_one_or_none()
        if blob is None:
            raise UnknownTaskError([f"function {digest}"])
        return bytes(blob)
