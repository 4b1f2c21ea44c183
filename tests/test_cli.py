"""The ``taskray`` command, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from taskray.models import TaskState
from taskray.serialization import decode
from taskray.store import Store


def taskray(
    *args: str, database_url: str, timeout: float = 120, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TASKRAY_DATABASE_URL": database_url, "COLUMNS": "200"}
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "taskray.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process ended while we looked
        if text in args:
            found.append(args)
    return found


def test_demo_runs_the_pipeline_to_the_end(sqlite_url: str) -> None:
    # Short: Ray's socket paths under it must stay within the 107-byte AF_UNIX limit.
    ray_dir = tempfile.mkdtemp(prefix="trd-")
    done = taskray("demo", database_url=sqlite_url, extra_env={"RAY_TMPDIR": ray_dir})
    assert done.returncode == 0, done.stderr
    assert "repeat deduplicated: True" in done.stdout
    assert "dead-letter queue" in done.stdout
    with Store.open(sqlite_url, migrate=False) as store:
        counts = store.count_by_status()
        tasks = store.list_tasks()
        assert counts == {TaskState.SUCCEEDED: 8, TaskState.DEAD: 1}
        by_function = {t.type.rsplit(":", 1)[-1]: t for t in tasks}
        report = decode(by_function["report"].result, by_function["report"].encoding)
        assert report.startswith("max=100.0, mean=49.957") and report.endswith("on GPU 0")
        assert len(store.attempts(by_function["fetch_prices"].id)) == 2
        assert by_function["parse_record"].status is TaskState.DEAD
        dead_id = str(by_function["parse_record"].id)
    # It leaves nothing running: no process of its Ray session survives it.
    assert processes_mentioning(ray_dir) == []

    listed = taskray("dlq", "list", "--json", database_url=sqlite_url)
    assert listed.returncode == 0, listed.stderr
    assert [t["id"] for t in json.loads(listed.stdout)] == [dead_id]

    shown = taskray("status", dead_id, "--json", database_url=sqlite_url)
    assert json.loads(shown.stdout)["status"] == "dead"

    replayed = taskray("dlq", "replay", dead_id, database_url=sqlite_url)
    assert replayed.returncode == 0 and "replayed 1" in replayed.stdout
    with Store.open(sqlite_url, migrate=False) as store:
        assert store.get(dead_id).status is TaskState.QUEUED


def test_bad_input_exits_non_zero_with_one_line(sqlite_url: str) -> None:
    assert taskray("db", "upgrade", database_url=sqlite_url).returncode == 0
    for args in (
        ("status", "not-a-uuid"),
        ("status", "00000000-0000-0000-0000-000000000000"),
        ("dlq", "replay"),
        ("dlq", "purge", "00000000-0000-0000-0000-000000000000", "--all"),
    ):
        done = taskray(*args, database_url=sqlite_url)
        assert done.returncode == 2, (args, done.stdout)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("taskray: "), (args, done.stderr)


def test_unmigrated_database_is_reported_not_changed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    done = taskray("dlq", "list", database_url=url)
    assert done.returncode == 2
    assert "taskray db upgrade" in done.stderr
    current = taskray("db", "current", database_url=url)
    assert "database: empty" in current.stdout
