"""The one adapter between the scheduler and Ray.

It reads Ray's nodes into ``NodeView``s and turns a placement into a Ray task
pinned to its node. Nothing else in taskray imports Ray's state APIs: they are
not stable public API, so they stay behind this page.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from taskray import executor
from taskray.models import Task
from taskray.policy.types import NodeView, Release

log = logging.getLogger(__name__)

#: Ray's bookkeeping resources that no task requests.
_IGNORED_RESOURCES = ("object_store_memory",)
_IGNORED_PREFIXES = ("node:",)
#: Metadata key choosing the worker process: "fresh" (a new process per task, so GPU memory
#: is released) or "reuse" (a warm process: saves the ~2.5 s worker start).
WORKER_METADATA_KEY = "taskray:worker"

# Declared without GPUs on purpose: Ray gives a function declared with GPUs a new process
# for every call; set per call with .options(), the worker stays reusable.
# Ray's stubs cannot type a function re-wrapped with options, hence Any.
_execute_in_warm_worker: Any = ray.remote(max_retries=0)(executor.execute)
_execute_in_fresh_worker: Any = ray.remote(max_retries=0, max_calls=1)(executor.execute)


def _schedulable(resources: Mapping[str, float]) -> dict[str, float]:
    return {
        name: float(amount)
        for name, amount in resources.items()
        if name not in _IGNORED_RESOURCES and not name.startswith(_IGNORED_PREFIXES)
    }


def read_nodes(
    used_by_taskray: Mapping[str, Mapping[str, float]],
    releases: Mapping[str, Sequence[Release]] | None = None,
    recently_released: Mapping[str, Mapping[str, float]] | None = None,
) -> list[NodeView]:
    """Alive nodes with what is free on each: the lesser of Ray's own view and the node's
    total less what taskray has leased there (Ray's view lags what was just dispatched).

    Ray's view also lags what just ended: ``recently_released`` (per node, what taskray's
    tasks gave back in the last moment) counts as free on Ray's side too, so a freed GPU
    is used at once rather than a pass later. ``releases`` says what running tasks will
    give back by when, per node."""
    try:
        available = ray._private.state.available_resources_per_node()  # type: ignore[no-untyped-call]
    except Exception:  # a private API: fall back to totals and the ledger alone
        log.debug("per-node availability unavailable", exc_info=True)
        available = None
    views = []
    for node in ray.nodes():  # type: ignore[no-untyped-call]
        if not node.get("Alive"):
            continue
        node_id = node["NodeID"]
        total = _schedulable(node.get("Resources") or {})
        used = used_by_taskray.get(node_id, {})
        ray_free = _schedulable(available.get(node_id, {})) if available is not None else None
        free = {}
        for name, amount in total.items():
            by_ledger = amount - used.get(name, 0.0)
            # Ray leaves out resources that are at zero: absent means none free.
            by_ray = (
                ray_free.get(name, 0.0) + (recently_released or {}).get(node_id, {}).get(name, 0.0)
                if ray_free is not None
                else by_ledger
            )
            free[name] = max(0.0, min(by_ledger, by_ray))
        labels = {k: str(v) for k, v in (node.get("Labels") or {}).items()}
        views.append(
            NodeView(
                node_id=node_id,
                total=total,
                free=free,
                labels=labels,
                releases=tuple((releases or {}).get(node_id, ())),
            )
        )
    views.sort(key=lambda view: view.node_id)
    return views


def wants_fresh_worker(task: Task) -> bool:
    """GPU tasks get a fresh process by default (GPU memory is released when it exits);
    others reuse warm workers. A task can ask for either through its metadata."""
    choice = task.metadata.get(WORKER_METADATA_KEY)
    if choice in ("fresh", "reuse"):
        return bool(choice == "fresh")
    return task.resources.num_gpus > 0


@dataclass
class Dispatched:
    """A task running (or about to) in Ray, as the scheduler tracks it."""

    task_id: uuid.UUID
    lease_id: uuid.UUID
    node_id: str
    ref: Any
    #: What it holds on its node, in Ray's names.
    resources: dict[str, float] = field(default_factory=dict)
    #: Set when the scheduler cancelled it (timeout, cancel); its end is then expected.
    stopped_because: str | None = None


def dispatch(
    task: Task,
    lease_id: uuid.UUID,
    node_id: str,
    database_url: str,
    *,
    heartbeat_interval_s: float,
    lease_ttl_s: float,
) -> Dispatched:
    resources = task.resources
    options: dict[str, Any] = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        # Named after the task, so the Ray dashboard shows which task runs where.
        "name": f"taskray:{task.type}:{task.id}",
    }
    if resources.memory:
        options["memory"] = resources.memory
    if resources.custom:
        options["resources"] = dict(resources.custom)
    remote = _execute_in_fresh_worker if wants_fresh_worker(task) else _execute_in_warm_worker
    ref = remote.options(**options).remote(
        database_url, str(task.id), str(lease_id), heartbeat_interval_s, lease_ttl_s
    )
    return Dispatched(
        task_id=task.id,
        lease_id=lease_id,
        node_id=node_id,
        ref=ref,
        resources=task.resources.as_dict(),
    )


def finished(in_flight: Sequence[Dispatched], timeout_s: float) -> list[Dispatched]:
    """Those of ``in_flight`` whose Ray task has ended, waiting up to ``timeout_s`` for one."""
    if not in_flight:
        return []
    by_ref = {d.ref: d for d in in_flight}
    # Return at the first end (not after the timeout), then take whatever else has ended.
    ready, rest = ray.wait(list(by_ref), num_returns=1, timeout=timeout_s)
    if ready and rest:
        ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
    return [by_ref[ref] for ref in ready]


def outcome(dispatched: Dispatched) -> tuple[str | None, str | None]:
    """(what the executor reported, or None) and (Ray's error, or None) for an ended task."""
    try:
        return str(ray.get(dispatched.ref)), None
    except ray.exceptions.RayError as exc:
        # Worker crash, node death, out of memory, cancellation: the executor could not
        # report, so the scheduler records the attempt as failed.
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def cancel(dispatched: Dispatched, reason: str) -> None:
    dispatched.stopped_because = reason
    # force=True kills the worker process: a handler stuck in C code or a sleep stops too.
    ray.cancel(dispatched.ref, force=True)
