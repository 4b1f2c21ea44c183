"""The ``taskray`` command line.

Bad input ends with a non-zero exit and one line on stderr; database URLs are
shown with their password hidden.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from taskray.errors import TaskrayError
from taskray.models import Task
from taskray.store import Store
from taskray.store.engine import (
    create_engine,
    current_revision,
    default_database_url,
    head_revision,
    migrate,
    redacted,
)

app = typer.Typer(
    help="taskray: a durable, compute-aware task scheduler for Ray.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
dlq_app = typer.Typer(help="The dead-letter queue.", no_args_is_help=True)
app.add_typer(db_app, name="db")
keys_app = typer.Typer(help="API keys of the REST API.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
app.add_typer(keys_app, name="keys")

console = Console()
DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="TASKRAY_DATABASE_URL",
        help="PostgreSQL or SQLite URL (default: the embedded SQLite file).",
        show_default=False,
    ),
]


def _fail(message: str) -> None:
    typer.echo(f"taskray: {message}", err=True)
    raise typer.Exit(code=2)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except TaskrayError as exc:
        _fail(exc.message)


@contextmanager
def _store(url: str | None) -> Iterator[Store]:
    with _errors(), Store.open(url or default_database_url(), migrate=False) as store:
        yield store


def _task_json(task: Task) -> dict[str, Any]:
    return {
        "id": str(task.id),
        "type": task.type,
        "queue": task.queue,
        "tenant": task.tenant,
        "status": task.status.value,
        "priority": task.priority,
        "attempt": task.attempt,
        "node_id": task.node_id,
        "created_at": task.created_at.isoformat(),
        "completed_at": task.completed_at.isoformat() if task.completed_at else None,
        "result": task.result,
        "last_error": task.last_error,
    }


@app.command()
def demo(database_url: DatabaseOption = None) -> None:
    """Run the embedded demo end to end and show every task's state."""
    from taskray.demo import run_demo

    with _errors():
        run_demo(database_url, console)


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseOption = None) -> None:
    """Create or upgrade the schema to the current revision."""
    url = database_url or default_database_url()
    with _errors():
        engine = create_engine(url)
        try:
            migrate(engine)
            console.print(f"schema at revision {current_revision(engine)} on {redacted(url)}")
        finally:
            engine.dispose()


@db_app.command("current")
def db_current(database_url: DatabaseOption = None) -> None:
    """Show the schema revision of the database and the one this taskray needs."""
    url = database_url or default_database_url()
    with _errors():
        engine = create_engine(url)
        try:
            console.print(
                f"database: {current_revision(engine) or 'empty'}; needed: {head_revision()}"
            )
        finally:
            engine.dispose()


@app.command()
def status(
    task_id: str,
    database_url: DatabaseOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one task and its attempts."""
    with _store(database_url) as store:
        task = store.get(task_id)
        attempts = store.attempts(task.id)
    if as_json:
        typer.echo(json.dumps(_task_json(task) | {"attempts": len(attempts)}, indent=2))
        return
    console.print(_tasks_table([task], title=f"task {task.id}"))
    for attempt in attempts:
        console.print(
            f"  attempt {attempt.attempt}: {attempt.outcome or 'in progress'} on "
            f"{attempt.node_id or '-'} {attempt.error or ''}"
        )


def _tasks_table(tasks: list[Task], title: str) -> Table:
    table = Table(title=title)
    for column in ("id", "type", "queue", "prio", "state", "attempt", "error"):
        table.add_column(column)
    for task in tasks:
        table.add_row(
            str(task.id),
            task.type,
            task.queue,
            str(task.priority),
            task.status.value,
            str(task.attempt),
            (task.last_error or "")[:60],
        )
    return table


@dlq_app.command("list")
def dlq_list(
    database_url: DatabaseOption = None,
    queue: Annotated[str | None, typer.Option(help="Only this queue.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List dead-lettered tasks, newest first."""
    with _store(database_url) as store:
        dead = store.list_dead(queue=queue, limit=limit)
    if as_json:
        typer.echo(json.dumps([_task_json(t) for t in dead], indent=2))
    else:
        console.print(_tasks_table(dead, title=f"dead-letter queue ({len(dead)})"))


@dlq_app.command("replay")
def dlq_replay(
    task_ids: Annotated[list[str] | None, typer.Argument(help="Task ids; none with --all.")] = None,
    database_url: DatabaseOption = None,
    queue: Annotated[str | None, typer.Option(help="With --all: only this queue.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead task.")] = False,
) -> None:
    """Put dead tasks back in the queue with a fresh retry budget."""
    if bool(task_ids) == replay_all:
        _fail("name task ids, or pass --all (not both)")
    with _store(database_url) as store:
        replayed = store.replay(task_ids) if task_ids else store.replay(queue=queue)
    console.print(f"replayed {len(replayed)} task(s)")


@dlq_app.command("purge")
def dlq_purge(
    task_ids: Annotated[list[str] | None, typer.Argument(help="Task ids; none with --all.")] = None,
    database_url: DatabaseOption = None,
    queue: Annotated[str | None, typer.Option(help="With --all: only this queue.")] = None,
    purge_all: Annotated[bool, typer.Option("--all", help="Purge every dead task.")] = False,
) -> None:
    """Delete dead tasks for good."""
    if bool(task_ids) == purge_all:
        _fail("name task ids, or pass --all (not both)")
    with _store(database_url) as store:
        count = store.purge(task_ids) if task_ids else store.purge(queue=queue)
    console.print(f"purged {count} task(s)")


@app.command()
def api(
    database_url: DatabaseOption = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    no_auth: Annotated[
        bool,
        typer.Option(
            "--no-auth", help="Serve without API keys, as the default tenant (local use only)."
        ),
    ] = False,
) -> None:
    """Serve the REST API with uvicorn."""
    import uvicorn

    from api import Settings, create_app

    url = database_url or default_database_url()
    settings = Settings(database_url=url, auth_enabled=not no_auth)
    if no_auth:
        typer.echo("taskray: serving WITHOUT authentication (--no-auth)", err=True)
    with _errors():
        # access_log off: the request line is harmless, but an operator's proxy may put a
        # key in a query string by mistake; nothing here should ever write it down.
        uvicorn.run(create_app(settings), host=host, port=port, access_log=False)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for.")],
    name: Annotated[str, typer.Option(help="A name to recognise the key by.")],
    scope: Annotated[
        list[str], typer.Option("--scope", help="submit, read or admin; repeatable.")
    ] = ["submit", "read"],  # noqa: B006 - typer copies option defaults
    database_url: DatabaseOption = None,
) -> None:
    """Create an API key; its secret is printed once, here, and never again."""
    with _store(database_url) as store:
        key, secret = store.create_key(tenant, name, scope)
    typer.echo(f"key {key.id} for tenant {key.tenant} ({', '.join(key.scopes)})", err=True)
    typer.echo(secret)


@keys_app.command("list")
def keys_list(
    database_url: DatabaseOption = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    include_revoked: Annotated[bool, typer.Option("--all", help="Revoked keys too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List API keys (never their secrets: only hashes are stored)."""
    with _store(database_url) as store:
        keys = store.list_keys(tenant=tenant, include_revoked=include_revoked)
    rows = [
        {
            "id": str(k.id),
            "tenant": k.tenant,
            "name": k.name,
            "scopes": list(k.scopes),
            "created_at": k.created_at.isoformat(),
            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
        }
        for k in keys
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"API keys ({len(rows)})")
    for column in ("id", "tenant", "name", "scopes", "created", "revoked"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["id"]),
            str(row["tenant"]),
            str(row["name"]),
            ",".join(row["scopes"]),  # type: ignore[arg-type]
            str(row["created_at"]),
            str(row["revoked_at"] or ""),
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, database_url: DatabaseOption = None) -> None:
    """Revoke an API key; requests with it are refused from now on."""
    with _store(database_url) as store:
        key = store.revoke_key(key_id)
    console.print(f"revoked key {key.id} of tenant {key.tenant}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
