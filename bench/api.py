"""REST API throughput on loopback: single submits per second and batch-submitted tasks per
second, on SQLite and PostgreSQL, each against a fresh database.

    .venv/bin/python bench/api.py                   # both backends
    .venv/bin/python bench/api.py --seconds 3 --backend sqlite

The server runs as its own process (uvicorn, one worker, auth on, as deployed), so the
load generator does not share its GIL. Every phase is bounded both in time and in count.
PostgreSQL databases are created on ``--pg-url`` and dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import sqlalchemy as sa

from taskray.store import Store, create_engine, migrate

DEFAULT_PG = os.environ.get(
    "TASKRAY_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def database(backend: str, pg_url: str) -> Iterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            engine = create_engine(url)
            migrate(engine)
            engine.dispose()
            yield url
        return
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    name = f"taskray_bench_api_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    try:
        engine = create_engine(url)
        migrate(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def api_server(url: str) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # The API accepts only registered task types: the benches' handlers module.
    env = {**os.environ, "TASKRAY_DATABASE_URL": url, "TASKRAY_TASK_MODULES": "bench.handlers"}
    # The listening socket is handed over (--fd), so no other process can take the port.
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.app:app", "--fd", str(sock.fileno()),
         "--log-level", "warning", "--no-access-log"],
        env=env,
        pass_fds=[sock.fileno()],
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.05)  # polling readiness, bounded by the deadline
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        sock.close()


def single_submits(base: str, secret: str, clients: int, seconds: float, limit: int) -> float:
    done = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        nonlocal done
        headers = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            while time.monotonic() < stop_at:
                with lock:
                    if done >= limit:
                        return
                    done += 1
                response = client.post(
                    "/v1/tasks", json={"type": "bench.handlers:noop", "payload": 1}
                )
                response.raise_for_status()

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done / (time.monotonic() - started)


def batch_submits(base: str, secret: str, size: int, seconds: float, limit: int) -> float:
    body = {"tasks": [{"type": "bench.handlers:noop", "payload": i} for i in range(size)]}
    headers = {"Authorization": f"Bearer {secret}"}
    sent = 0
    with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
        started = time.monotonic()
        while sent < limit and time.monotonic() - started < seconds:
            client.post("/v1/tasks/batch", json=body).raise_for_status()
            sent += size
        return sent / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--seconds", type=float, default=5.0, help="per phase")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    rows = []
    for backend in backends:
        with database(backend, args.pg_url) as url:
            with Store.open(url, migrate=False) as store:
                _, secret = store.create_key("bench", "bench", ["submit"])
            with api_server(url) as base:
                single = single_submits(base, secret, args.clients, args.seconds, 20_000)
                batch = batch_submits(base, secret, args.batch_size, args.seconds, 200_000)
            rows.append((backend, single, batch))
    print(f"\nREST API on loopback, {os.cpu_count()} cores; {args.seconds:.0f} s per phase")
    print(f"{'backend':<12}{'single submit req/s':>22}{'batch submit tasks/s':>24}")
    for backend, single, batch in rows:
        print(f"{backend:<12}{single:>22,.0f}{batch:>24,.0f}")
    print(
        f"(single: {args.clients} keep-alive clients, one task per POST /v1/tasks; "
        f"batch: {args.batch_size} tasks per POST /v1/tasks/batch, one client)"
    )


if __name__ == "__main__":
    main()
