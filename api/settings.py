"""The API server's settings, read from ``TASKRAY_*`` environment variables by default."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from taskray.models import DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_TENANT


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TASKRAY_", extra="ignore")

    #: PostgreSQL or SQLite URL; the schema must already be at head (`taskray db upgrade`).
    database_url: str
    #: Off only when asked for: an API without keys serves every caller as one tenant.
    auth_enabled: bool = True
    #: The tenant every request acts as while auth is off.
    default_tenant: str = DEFAULT_TENANT
    #: Largest task payload (its JSON) accepted.
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, gt=0)
    #: Largest request body; bounds the memory one request can take before validation.
    max_body_bytes: int = Field(default=64 << 20, gt=0)
    #: Most tasks in one batch submit (one transaction).
    max_batch_size: int = Field(default=10_000, gt=0)
