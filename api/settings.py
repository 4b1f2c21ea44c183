"""The API server's settings, read from ``TASKRAY_*`` environment variables by default."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from taskray.models import DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_TENANT
from taskray.registry import parse_modules


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
    #: The deployment's task modules (``TASKRAY_TASK_MODULES``: module names, comma
    #: separated): only their ``@taskray.task`` functions are accepted as task types. The
    #: executors read the same variable, so set it for both.
    task_modules: Annotated[tuple[str, ...], NoDecode] = ()

    @field_validator("task_modules", mode="before")
    @classmethod
    def _module_names(cls, value: object) -> object:
        return parse_modules(value) if isinstance(value, str) else value
