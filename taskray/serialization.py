"""How Python calls and results travel through the store's JSON columns.

Tasks submitted by name from the REST API or the CLI carry plain JSON. Tasks
submitted from Python with a database connection carry their arguments pickled
(cloudpickle, so lambdas, numpy arrays and notebook classes survive), base64-encoded
under one key; an upstream task's handle among the arguments becomes an
``UpstreamResult`` marker that the executor swaps for that task's result before the call.

Which of the two a task holds is recorded in its ``encoding`` (``models.Encoding``) and
read from there, never from a value's shape: a JSON value that looks like a pickle stays
the JSON value it is.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import cloudpickle

from taskray.errors import InvalidTaskError
from taskray.models import Encoding

T = TypeVar("T")

#: The key under which a pickled value travels in a JSON column.
PICKLE_KEY = "__taskray_pickle__"
#: In a plain-JSON payload, ``{UPSTREAM_KEY: "<task id>"}`` stands for an upstream's result.
UPSTREAM_KEY = "__taskray_upstream__"
#: Task types of functions shipped by value start with this prefix.
PICKLED_TYPE_PREFIX = "pickled:"


@dataclass(frozen=True, slots=True)
class UpstreamResult:
    """Stands, among a task's arguments, for the result of upstream task ``task_id``."""

    task_id: uuid.UUID


def dumps(value: Any) -> bytes:
    try:
        return bytes(cloudpickle.dumps(value))
    except Exception as exc:
        raise InvalidTaskError(f"cannot pickle {type(value).__name__}: {exc}") from None


def to_json(value: Any) -> dict[str, str]:
    return {PICKLE_KEY: base64.b64encode(dumps(value)).decode("ascii")}


def is_pickled(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {PICKLE_KEY}


def decode(value: Any, encoding: Encoding) -> Any:
    """A stored payload or result as the value it encodes: unpickled only when its task
    records the pickle encoding (a trusted Python client's); JSON is returned as it is."""
    if encoding is not Encoding.PICKLE:
        return value
    if not is_pickled(value):
        raise InvalidTaskError("a pickle-encoded value is not a pickle document")
    return cloudpickle.loads(base64.b64decode(value[PICKLE_KEY]))


def encode_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, str]:
    return to_json((list(args), dict(kwargs)))


def decode_call(
    payload: Any, encoding: Encoding, upstream: Callable[[uuid.UUID], Any]
) -> tuple[list[Any], dict[str, Any]]:
    """The arguments of a call, upstream markers replaced through ``upstream(task_id)``.

    A plain-JSON payload follows the by-name convention: ``{"args": [...], "kwargs": {...}}``
    is spread into the call, anything else is the single argument (``None``: no argument).
    """
    if encoding is Encoding.PICKLE:
        args, kwargs = decode(payload, encoding)
        return substitute(args, upstream), substitute(kwargs, upstream)
    if isinstance(payload, dict) and payload and set(payload) <= {"args", "kwargs"}:
        args = _substitute_json(list(payload.get("args") or []), upstream)
        kwargs = _substitute_json(dict(payload.get("kwargs") or {}), upstream)
        return args, kwargs
    return ([] if payload is None else [payload]), {}


def encode_json_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call as plain JSON (for clients of the REST API, which never sends pickles)."""
    document = {
        "args": replace_instances(list(args), UpstreamResult, _upstream_as_json),
        "kwargs": replace_instances(kwargs, UpstreamResult, _upstream_as_json),
    }
    try:
        json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidTaskError(f"over the REST API, arguments must be JSON: {exc}") from None
    return document


def _upstream_as_json(marker: UpstreamResult) -> dict[str, str]:
    return {UPSTREAM_KEY: str(marker.task_id)}


def _substitute_json(value: Any, upstream: Callable[[uuid.UUID], Any]) -> Any:
    if isinstance(value, dict):
        if set(value) == {UPSTREAM_KEY}:
            return upstream(uuid.UUID(str(value[UPSTREAM_KEY])))
        return {k: _substitute_json(v, upstream) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_json(v, upstream) for v in value]
    return value


def replace_instances(value: Any, kind: type[T], replace: Callable[[T], Any]) -> Any:
    """``value`` rebuilt with ``replace(x)`` for every ``kind`` instance ``x`` inside its
    lists, tuples and dicts (the places a call's arguments can hold handles)."""
    if isinstance(value, kind):
        return replace(value)
    if isinstance(value, list):
        return [replace_instances(v, kind, replace) for v in value]
    if isinstance(value, tuple):
        return tuple(replace_instances(v, kind, replace) for v in value)
    if isinstance(value, dict):
        return {k: replace_instances(v, kind, replace) for k, v in value.items()}
    return value


def substitute(value: Any, upstream: Callable[[uuid.UUID], Any]) -> Any:
    """``value`` with every ``UpstreamResult`` inside lists, tuples and dicts replaced."""
    return replace_instances(value, UpstreamResult, lambda marker: upstream(marker.task_id))


def function_digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def pickled_type(qualname: str, digest: str) -> str:
    """The task type of a function shipped by value: readable, and unique per content."""
    safe = "".join(c if c.isalnum() or c in "_." else "_" for c in qualname)[:120]
    return f"{PICKLED_TYPE_PREFIX}{safe}/{digest}"


def registration_digest(task_type: str) -> str:
    """The functions-table key under which a trusted Python client registers the
    ``module:function`` type of an ``@taskray.task`` function it submits."""
    return hashlib.sha256(b"taskray-type:" + task_type.encode()).hexdigest()


def digest_of_type(task_type: str) -> str | None:
    if not task_type.startswith(PICKLED_TYPE_PREFIX) or "/" not in task_type:
        return None
    return task_type.rsplit("/", 1)[1]
