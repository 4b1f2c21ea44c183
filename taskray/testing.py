"""Helpers for testing code that uses taskray: a controllable clock and task factories."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection

from taskray.models import Resources, RetryPolicy, TaskSpec


class FakeClock:
    """A clock that moves only when told to; give it to ``Store(clock=...)``.

    Every store operation then runs at exactly ``clock.now()``, so lease expiry and
    retry backoff can be tested without sleeping.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2030, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def now(self, connection: Connection | None = None) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            return self._now

    def set(self, when: datetime) -> None:
        with self._lock:
            self._now = when


def make_spec(type: str = "tests:noop", **overrides: Any) -> TaskSpec:
    """A valid ``TaskSpec`` with sensible defaults; keyword arguments override fields."""
    if "max_retries" in overrides:
        overrides["retry"] = RetryPolicy(
            max_retries=overrides.pop("max_retries"),
            backoff_base_s=overrides.pop("backoff_base_s", 1.0),
            backoff_cap_s=overrides.pop("backoff_cap_s", 60.0),
            jitter=overrides.pop("jitter", 0.0),
        )
    for name in ("num_cpus", "num_gpus", "memory"):
        if name in overrides:
            resources = overrides.get("resources", Resources())
            overrides["resources"] = Resources(
                num_cpus=overrides.pop("num_cpus", resources.num_cpus),
                num_gpus=overrides.pop("num_gpus", resources.num_gpus),
                memory=overrides.pop("memory", resources.memory),
                custom=resources.custom,
            )
    return TaskSpec(type=type, **overrides)
