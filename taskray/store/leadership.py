"""The scheduler leader lease: one leader at a time, each takeover a higher epoch that
fences the one before (DESIGN invariant 5)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from taskray.store.base import DEFAULT_LEADER_NAME, StoreBase
from taskray.store.tables import leader_leases


@dataclass(frozen=True, slots=True)
class Leadership:
    name: str
    holder: str
    epoch: int
    expires_at: datetime


class LeadershipMixin(StoreBase):
    def acquire_leadership(
        self,
        holder: str,
        *,
        ttl_s: float = 15.0,
        name: str = DEFAULT_LEADER_NAME,
        fresh: bool = False,
    ) -> int | None:
        """Take or renew the leader lease; returns the epoch held, or None if another leads.

        A holder that renews in time keeps its epoch; a takeover (or a holder coming back
        after its lease ran out) gets a new, higher epoch, which fences the old one. With
        ``fresh`` a holder still in its lease takes a new epoch too: a restarted process
        under the same holder name fences whatever its previous incarnation still sends.
        """
        with self.transaction() as (connection, now):
            expires = now + timedelta(seconds=ttl_s)
            # The same INSERT ... ON CONFLICT DO NOTHING on both; SQLAlchemy spells it per dialect.
            insert = (
                postgresql.insert(leader_leases)
                if self.is_postgres
                else sqlite.insert(leader_leases)
            )
            connection.execute(
                insert.values(
                    name=name, holder=holder, epoch=0, expires_at=now
                ).on_conflict_do_nothing()
            )
            row = (
                connection.execute(
                    self._lock(sa.select(leader_leases).where(leader_leases.c.name == name))
                )
                .mappings()
                .one()
            )
            if row["expires_at"] > now and row["holder"] != holder:
                return None
            renewal = row["holder"] == holder and row["expires_at"] > now and not fresh
            epoch = row["epoch"] if renewal else row["epoch"] + 1
            connection.execute(
                sa.update(leader_leases)
                .where(leader_leases.c.name == name, leader_leases.c.epoch == row["epoch"])
                .values(holder=holder, epoch=epoch, expires_at=expires)
            )
            return int(epoch)

    def release_leadership(self, holder: str, *, name: str = DEFAULT_LEADER_NAME) -> None:
        with self.transaction() as (connection, now):
            connection.execute(
                sa.update(leader_leases)
                .where(leader_leases.c.name == name, leader_leases.c.holder == holder)
                .values(expires_at=now)
            )

    def leadership(self, *, name: str = DEFAULT_LEADER_NAME) -> Leadership | None:
        """The current leader, if its lease has not run out."""
        with self.transaction() as (connection, now):
            row = (
                connection.execute(
                    sa.select(leader_leases).where(
                        leader_leases.c.name == name, leader_leases.c.expires_at > now
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            return None
        return Leadership(row["name"], row["holder"], row["epoch"], row["expires_at"])
