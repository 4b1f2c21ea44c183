"""The task types a deployment runs by name.

A task runs only if its type is registered (DESIGN, Trust). By name, that is a function
marked with ``@taskray.task`` (or the lighter ``@taskray.handler``) and defined in one of
the modules the deployment names in ``TASKRAY_TASK_MODULES`` (module names, comma
separated): its type is ``module:function``. The API refuses any other type, the
executor refuses to run one, and no other module is imported because a task named it.

The executor also runs two kinds of type that only a trusted Python client (one that holds
the database, in embedded or database mode) can register, through the store's functions
table (see :mod:`taskray.executor`): functions shipped by value (``pickled:...``), and the
``module:function`` types of ``@taskray.task`` functions that client submitted.

This module imports neither the SDK nor the store: every worker process imports it.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from taskray.errors import UnregisteredTaskTypeError

#: The deployment's task modules: module names, comma separated.
TASK_MODULES_ENV = "TASKRAY_TASK_MODULES"
#: The attribute that marks a function as a task (set by ``@taskray.task`` and ``handler``).
TASK_MARK = "__taskray_task__"

F = TypeVar("F", bound=Callable[..., Any])


def handler(function: F) -> F:
    """Mark a plain function as a task handler, registered as ``module:function`` when its
    module is one of the deployment's task modules. The function is returned unchanged and
    the SDK is not imported: for handler modules that every worker imports."""
    setattr(function, TASK_MARK, True)
    return function


def is_task(value: object) -> bool:
    return getattr(value, TASK_MARK, False) is True


def type_name(function: object) -> str:
    """``module:qualname``: the type a marked function is registered under."""
    return f"{getattr(function, '__module__', '')}:{getattr(function, '__qualname__', '')}"


def parse_modules(value: str | None) -> tuple[str, ...]:
    """Module names from a comma-separated setting; blanks ignored, order kept, no repeats."""
    names = (part.strip() for part in (value or "").split(","))
    return tuple(dict.fromkeys(name for name in names if name))


def configured_modules(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    return parse_modules((os.environ if environ is None else environ).get(TASK_MODULES_ENV))


class TaskRegistry:
    """The task types defined in ``modules``, each module imported on first use."""

    def __init__(self, modules: Iterable[str]) -> None:
        self.modules = tuple(modules)
        self._types: dict[str, Callable[..., Any]] = {}
        #: Modules imported (and scanned) so far; the reason for each that failed.
        self._imported: set[str] = set()
        self._failed: dict[str, str] = {}
        # Reentrant: a task module may itself resolve a type while it is being imported.
        self._lock = threading.RLock()

    def load_all(self) -> list[str]:
        """Import every module now (a server checks its setting at start); returns the
        registered types. A module that cannot be imported is an error."""
        for module in self.modules:
            self._import(module)
            if module in self._failed:
                raise UnregisteredTaskTypeError(
                    f"task module {module!r} ({TASK_MODULES_ENV}) cannot be imported: "
                    f"{self._failed[module]}"
                )
        with self._lock:
            return sorted(self._types)

    def resolve(self, task_type: str) -> Callable[..., Any]:
        """The function registered as ``task_type``; ``UnregisteredTaskTypeError`` saying why
        when there is none. Only a listed module is ever imported."""
        module, sep, attribute = task_type.partition(":")
        if not sep or not module or not attribute:
            raise UnregisteredTaskTypeError(
                f"task type {task_type!r} is not registered: name a task as 'module:function'"
            )
        if module not in self.modules:
            raise UnregisteredTaskTypeError(
                f"task type {task_type!r} is not registered: module {module!r} is not one of "
                f"this deployment's task modules ({TASK_MODULES_ENV})"
            )
        self._import(module)
        with self._lock:
            found = self._types.get(task_type)
            failed = self._failed.get(module)
        if found is not None:
            return found
        if failed is not None:
            raise UnregisteredTaskTypeError(
                f"task type {task_type!r} is not registered: its module cannot be imported: "
                f"{failed}"
            )
        raise UnregisteredTaskTypeError(
            f"task type {task_type!r} is not registered: module {module!r} defines no "
            f"function {attribute!r} marked with @taskray.task"
        )

    def _import(self, module: str) -> None:
        with self._lock:
            if module in self._imported:
                return
            # Imported under the lock: a module is imported and scanned once per process.
            self._imported.add(module)
            try:
                loaded = importlib.import_module(module)
            except Exception as exc:  # any import error of the user's module, reported
                self._failed[module] = f"{type(exc).__name__}: {exc}"
                return
            for value in vars(loaded).values():
                # Only functions defined in the module: one it imports from elsewhere is
                # registered where it is defined, if that module is listed.
                if is_task(value) and getattr(value, "__module__", None) == module:
                    self._types[type_name(value)] = value


_deployment: TaskRegistry | None = None
_deployment_lock = threading.Lock()


def deployment() -> TaskRegistry:
    """This process's registry of the modules named in ``TASKRAY_TASK_MODULES`` (read
    once: a worker process inherits the setting from its node or its Ray job)."""
    global _deployment
    with _deployment_lock:
        if _deployment is None:
            _deployment = TaskRegistry(configured_modules())
        return _deployment
