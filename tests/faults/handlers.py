"""Task handlers of the fault tests (imported on Ray workers as tests.faults.handlers; the
test session names this module in TASKRAY_TASK_MODULES, so its ``@handler`` functions run)."""

from __future__ import annotations

import functools
import os
import time

import sqlalchemy as sa

from taskray.executor import Commit
from taskray.registry import handler
from tests.handlers import _count_call

#: The sink a handler writes to inside the transaction that commits its result.
SINK_DDL = "CREATE TABLE sink (tag text NOT NULL)"


def _wait_for_release(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.01)


@handler
def held(release: str, calls: str, tag: str) -> str:
    """Counts its run in ``calls``, then runs until ``release`` exists."""
    _count_call(calls)
    _wait_for_release(release)
    return tag


def _insert(tag: str, connection: sa.Connection) -> None:
    connection.execute(sa.text("INSERT INTO sink (tag) VALUES (:tag)"), {"tag": tag})


@handler
def held_then_sink(release: str, calls: str, tag: str) -> Commit:
    """As ``held``, and writes a sink row with its result (exactly once, or not at all)."""
    _count_call(calls)
    _wait_for_release(release)
    return Commit(tag, functools.partial(_insert, tag))
