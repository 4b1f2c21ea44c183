"""The Celery app of bench/throughput.py: the same handlers as Ray and taskray run.

Broker and result backend are Redis, on a database number of their own
(``TASKRAY_BENCH_REDIS_URL``, default ``redis://127.0.0.1:6379/13``), which the bench
flushes before it starts a worker. Every Celery setting that bears on speed is at its
default (JSON messages, prefetch multiplier 4, early acknowledgement).

    celery -A bench.celery_app worker --pool=prefork --concurrency=2
"""

from __future__ import annotations

import os

from celery import Celery

from bench import handlers

REDIS_URL = os.environ.get("TASKRAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")

app = Celery("taskray_bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.ping")
def ping() -> str:
    return "pong"


noop = app.task(name="bench.noop")(handlers.noop)
started_at = app.task(name="bench.started_at")(handlers.started_at)
sleep_ms = app.task(name="bench.sleep_ms")(handlers.sleep_ms)
