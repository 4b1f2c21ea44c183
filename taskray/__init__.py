"""taskray: a durable, compute-aware task scheduler for Ray clusters.

import taskray

@taskray.task(num_cpus=1)
def double(x):
    return 2 * x

taskray.init()
handle = double.submit(21)
assert taskray.get(handle) == 42
"""

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
