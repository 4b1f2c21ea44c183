"""Dependencies shared by the routers: settings, the store, and the caller's key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.settings import Settings
from taskray.errors import AuthenticationError, PermissionDeniedError
from taskray.registry import TaskRegistry
from taskray.store import API_SCOPES, Store


# Dependencies that do no I/O are async: a sync one costs a thread-pool hop per request.
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def get_registry(request: Request) -> TaskRegistry:
    registry: TaskRegistry = request.app.state.registry
    return registry


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
RegistryDep = Annotated[TaskRegistry, Depends(get_registry)]

_bearer = HTTPBearer(auto_error=False, description="An API key from `taskray keys create`.")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a tenant and what its key may do."""

    tenant: str
    scopes: tuple[str, ...]


def get_principal(
    settings: SettingsDep,
    store: StoreDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if not settings.auth_enabled:
        return Principal(settings.default_tenant, API_SCOPES)
    if credentials is None:
        raise AuthenticationError()
    key = store.authenticate(credentials.credentials)
    if key is None:
        # Says nothing about why (unknown, revoked, malformed), and never repeats the secret.
        raise AuthenticationError("the API key is not valid")
    return Principal(key.tenant, key.scopes)


def require(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    async def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if scope not in principal.scopes and "admin" not in principal.scopes:
            raise PermissionDeniedError(f"this API key lacks the {scope!r} scope")
        return principal

    return check


Reader = Annotated[Principal, Depends(require("read"))]
Submitter = Annotated[Principal, Depends(require("submit"))]
Admin = Annotated[Principal, Depends(require("admin"))]
