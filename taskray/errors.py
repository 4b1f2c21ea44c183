"""Every error taskray raises on purpose, under one root.

Each class's docstring is its default message. The API maps these to HTTP
statuses in one place; the SDK and CLI show the message as it is. Messages
never carry database URLs or credentials.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TaskrayError(Exception):
    """A taskray operation failed."""

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or (self.__doc__ or type(self).__name__).strip()
        self.details = details
        super().__init__(self.message)


class InvalidTaskError(TaskrayError, ValueError):
    """The task description is invalid."""


class InvalidPriorityError(InvalidTaskError):
    """The priority is out of range."""


class InvalidResourcesError(InvalidTaskError):
    """The resource request is invalid."""


class PayloadTooLargeError(InvalidTaskError):
    """The payload is larger than the store accepts."""


class CycleError(InvalidTaskError):
    """The dependencies form a cycle."""

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = list(cycle)
        super().__init__("dependency cycle: " + " -> ".join(self.cycle), cycle=self.cycle)


class UnregisteredTaskTypeError(InvalidTaskError):
    """The task type is not registered: only functions marked with @taskray.task in the
    deployment's task modules (TASKRAY_TASK_MODULES) run by name."""


class UnknownTaskError(TaskrayError, LookupError):
    """No such task."""

    def __init__(self, task_ids: Sequence[object]) -> None:
        self.task_ids = [str(t) for t in task_ids]
        super().__init__("unknown task: " + ", ".join(self.task_ids), task_ids=self.task_ids)


class InvalidStateError(TaskrayError):
    """The task is not in a state that allows this change."""


class LeaseLostError(TaskrayError):
    """The lease on this task is gone: it expired, was reaped, or the task was cancelled."""


class NotLeaderError(TaskrayError):
    """This scheduler does not hold the leader lease (its epoch is stale)."""


class StoreUnavailableError(TaskrayError):
    """The task store cannot be reached."""


class MigrationError(TaskrayError):
    """The database schema is not at the version this taskray expects."""


class NotInitializedError(TaskrayError):
    """taskray is not initialised: call taskray.init() first."""


class RemoteModeUnavailableError(TaskrayError):
    """Remote mode (taskray.init(url=..., api_key=...)) needs the taskray REST API server."""


class GetTimeoutError(TaskrayError, TimeoutError):
    """The tasks did not finish within the timeout."""


class TaskFailedError(TaskrayError):
    """The task did not succeed.

    ``status`` says how it ended; ``remote_traceback`` is the traceback of its last
    attempt on the worker, when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        task_id: str,
        status: str,
        remote_traceback: str | None = None,
    ) -> None:
        self.task_id = task_id
        self.status = status
        self.remote_traceback = remote_traceback
        text = (
            message
            if remote_traceback is None
            else f"{message}\n\nRemote traceback:\n{remote_traceback}"
        )
        super().__init__(text, task_id=task_id, status=status)


class InvalidArgumentError(TaskrayError, ValueError):
    """An argument is invalid (a filter, a cursor, a scope)."""


class AuthenticationError(TaskrayError):
    """A valid API key is needed: send it as `Authorization: Bearer <key>`."""


class PermissionDeniedError(TaskrayError):
    """This API key lacks the scope this operation needs."""
