"""Module-level task functions for the SDK tests (workers import them by name)."""

from __future__ import annotations

import os
import time

import taskray


@taskray.task
def add(a: int, b: int) -> int:
    return a + b


@taskray.task
def total(values: list[int], extra: dict[str, int] | None = None) -> int:
    return sum(values) + sum((extra or {}).values())


@taskray.task(num_gpus=1)
def which_gpu() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@taskray.task(max_retries=2, retry_backoff=0.1)
def explode(message: str) -> None:
    raise RuntimeError(message)


@taskray.task(max_retries=5, retry_on=[ConnectionError])
def wrong_kind_of_error() -> None:
    raise KeyError("not worth a retry")


@taskray.task
def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "rested"


@taskray.task
def big_result(size: int) -> bytes:
    return b"x" * size
