"""The fault-injection suite's fixtures: a PostgreSQL cluster of its own, and one Ray.

The suite restarts and stops its database, so it never uses the shared server the
other tests use: it runs ``initdb`` and ``pg_ctl`` from the machine's PostgreSQL
binaries into a temporary directory, on a free loopback port, and stops the cluster
at the end of the session. Without the binaries its tests skip, except under
``CI=true``, where that is a failure (as for the shared server in ``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import PostgresServer
from tests.ray_support import local_ray

#: PostgreSQL refuses to run as root; as root, the cluster runs as this user.
_SERVER_USER = "postgres"


def _bindir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: ``TASKRAY_PG_BINDIR``, ``pg_config
    --bindir``, the newest ``/usr/lib/postgresql/*/bin``, or ``PATH``."""
    candidates: list[str] = []
    if os.environ.get("TASKRAY_PG_BINDIR"):
        candidates.append(os.environ["TASKRAY_PG_BINDIR"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            candidates.append(
                subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, check=True
                ).stdout.strip()
            )
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
    )[::-1]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    for candidate in candidates:
        path = Path(candidate)
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivatePostgres:
    """A PostgreSQL cluster this test session owns: it may restart it, stop it, start it."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam(_SERVER_USER)
            except KeyError:
                raise RuntimeError(
                    f"running as root, and there is no {_SERVER_USER!r} user to run PostgreSQL"
                ) from None
            self.user = _SERVER_USER
            os.chown(root, account.pw_uid, account.pw_gid)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout_s: float = 60.0) -> None:
        completed = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if completed.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args)} failed ({completed.returncode}): "
                f"{completed.stdout}{completed.stderr}\n{log}"
            )

    def init(self) -> None:
        # --no-sync: the cluster is thrown away; fsync stays on for the server itself.
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is cut; back once it accepts them."""
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", "fast", "-w", "restart"
        )

    @property
    def running(self) -> bool:
        completed = subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
            user=self.user,
            capture_output=True,
            check=False,
        )
        return completed.returncode == 0


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    bindir = _bindir()
    if bindir is None:
        message = "no PostgreSQL server binaries (initdb, pg_ctl) found"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (required under CI=true)")
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="taskray-pg-"))
    server = PrivatePostgres(bindir, root)
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.running:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def private_databases(private_postgres: PrivatePostgres) -> Iterator[PostgresServer]:
    databases = PostgresServer(make_url(private_postgres.url).set(drivername="postgresql+psycopg"))
    yield databases
    if not private_postgres.running:
        private_postgres.start()
    databases.close()


@pytest.fixture
def pg(private_postgres: PrivatePostgres) -> Iterator[PrivatePostgres]:
    """The private cluster, running at the start of the test and after it."""
    if not private_postgres.running:
        private_postgres.start()
    yield private_postgres
    if not private_postgres.running:
        private_postgres.start()


@pytest.fixture
def fault_url(pg: PrivatePostgres, private_databases: PostgresServer) -> Iterator[str]:
    """A fresh, migrated database on the private cluster."""
    url = private_databases.create()
    yield url
    private_databases.drop(url)


@pytest.fixture(scope="package")
def fault_ray() -> Iterator[None]:
    """One local Ray for the whole suite (a start costs seconds)."""
    with local_ray(num_cpus=4):
        yield
