"""taskray: a durable, compute-aware task scheduler for Ray clusters.

import taskray

@taskray.task(num_cpus=1)
def double(x):
    return 2 * x

taskray.init()
handle = double.submit(21)
assert taskray.get(handle) == 42
"""

from typing import TYPE_CHECKING, Any

from taskray.errors import (
    CycleError,
    GetTimeoutError,
    InvalidPriorityError,
    InvalidResourcesError,
    InvalidTaskError,
    NotInitializedError,
    PayloadTooLargeError,
    RemoteModeUnavailableError,
    TaskFailedError,
    TaskrayError,
)
from taskray.executor import Commit, NonRetryableError
from taskray.models import Resources, TaskState
from taskray.registry import handler

if TYPE_CHECKING:
    from taskray.sdk import (
        HandleList,
        TaskFunction,
        TaskHandle,
        get,
        init,
        is_initialized,
        shutdown,
        submit,
        task,
        wait,
    )

#: The SDK is imported on first use: a Ray worker that runs tasks imports this package
#: (for the executor) and needs none of it, and importing it costs a new worker process
#: about a second.
_SDK_NAMES = frozenset(
    {
        "HandleList",
        "TaskFunction",
        "TaskHandle",
        "get",
        "init",
        "is_initialized",
        "shutdown",
        "submit",
        "task",
        "wait",
    }
)


def __getattr__(name: str) -> Any:
    if name in _SDK_NAMES:
        from taskray import sdk

        value = getattr(sdk, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'taskray' has no attribute {name!r}")


__all__ = [
    # connecting
    "init",
    "is_initialized",
    "shutdown",
    # submitting and waiting
    "HandleList",
    "TaskFunction",
    "TaskHandle",
    "get",
    "submit",
    "task",
    "wait",
    # handlers
    "Commit",
    "NonRetryableError",
    "handler",
    # values
    "Resources",
    "TaskState",
    # errors
    "CycleError",
    "GetTimeoutError",
    "InvalidPriorityError",
    "InvalidResourcesError",
    "InvalidTaskError",
    "NotInitializedError",
    "PayloadTooLargeError",
    "RemoteModeUnavailableError",
    "TaskFailedError",
    "TaskrayError",
]
