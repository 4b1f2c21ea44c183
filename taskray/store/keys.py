"""API keys: created with a secret shown once, stored only as its hash, revocable."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping

from taskray.errors import InvalidArgumentError
from taskray.store.base import StoreBase
from taskray.store.tables import api_keys

#: What an API key may do; ``admin`` implies the others.
API_SCOPES = ("submit", "read", "admin")
#: Marks a taskray secret, so that secret scanners and people recognise a leaked one.
API_KEY_PREFIX = "trk_"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as stored: never the secret, only who it belongs to and what it may do."""

    id: uuid.UUID
    tenant: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _api_key(row: RowMapping) -> ApiKey:
    return ApiKey(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        scopes=tuple(row["scopes"] or ()),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


class KeysMixin(StoreBase):
    def create_key(self, tenant: str, name: str, scopes: Sequence[str]) -> tuple[ApiKey, str]:
        """A new key and its secret. The secret is returned here once and never stored."""
        chosen = tuple(dict.fromkeys(scopes))
        unknown = [s for s in chosen if s not in API_SCOPES]
        if not chosen or unknown:
            raise InvalidArgumentError(
                f"scopes must be some of {', '.join(API_SCOPES)}; got {list(chosen)}"
            )
        for label, value in (("tenant", tenant), ("name", name)):
            if not value or len(value) > 200:
                raise InvalidArgumentError(f"{label} must be 1-200 characters")
        secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = uuid.uuid4()
        with self.transaction() as (connection, now):
            connection.execute(
                sa.insert(api_keys).values(
                    id=key_id,
                    tenant=tenant,
                    name=name,
                    scopes=list(chosen),
                    key_hash=_hash_secret(secret),
                    created_at=now,
                    revoked_at=None,
                )
            )
        return ApiKey(key_id, tenant, name, chosen, now, None), secret

    def list_keys(
        self, *, tenant: str | None = None, include_revoked: bool = False
    ) -> list[ApiKey]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self.transaction() as (connection, _):
            return [_api_key(r) for r in connection.execute(query).mappings()]

    def revoke_key(self, key_id: uuid.UUID | str) -> ApiKey:
        """Revoke a key for good; revoking a revoked key changes nothing."""
        try:
            key_uuid = key_id if isinstance(key_id, uuid.UUID) else uuid.UUID(str(key_id))
        except ValueError:
            raise InvalidArgumentError(f"no API key {key_id!r}") from None
        with self.transaction() as (connection, now):
            connection.execute(
                sa.update(api_keys)
                .where(api_keys.c.id == key_uuid, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            row = (
                connection.execute(sa.select(api_keys).where(api_keys.c.id == key_uuid))
                .mappings()
                .first()
            )
        if row is None:
            raise InvalidArgumentError(f"no API key {key_uuid}")
        return _api_key(row)

    def authenticate(self, secret: str) -> ApiKey | None:
        """The live key whose secret this is, or None. The lookup is by hash, so the
        secret itself never reaches SQL or a log."""
        if not secret.startswith(API_KEY_PREFIX) or len(secret) > 200:
            return None
        with self.transaction() as (connection, _):
            row = (
                connection.execute(
                    sa.select(api_keys).where(
                        api_keys.c.key_hash == _hash_secret(secret),
                        api_keys.c.revoked_at.is_(None),
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else _api_key(row)
