"""The Python SDK: ``@taskray.task``, ``submit``, handles, ``get`` and ``wait``."""

from taskray.sdk.functions import TaskFunction, TaskOptions, submit, task
from taskray.sdk.handles import HandleList, TaskHandle, get, wait
from taskray.sdk.runtime import init, is_initialized, shutdown

__all__ = [
    "HandleList",
    "TaskFunction",
    "TaskHandle",
    "TaskOptions",
    "get",
    "init",
    "is_initialized",
    "shutdown",
    "submit",
    "task",
    "wait",
]
