"""The one adapter between the scheduler and Ray.

It reads Ray's nodes into ``NodeView``s and turns a placement into a Ray task
pinned to its node. Nothing else in taskray imports Ray's state APIs: they are
not stable public API, so they stay behind this page.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from sqlalchemy.engine import make_url

from taskray import executor
from taskray.models import ReadyTask
from taskray.node import NodeAgent
from taskray.policy.types import NodeView, Release

log = logging.getLogger(__name__)

#: Ray's bookkeeping resources that no task requests.
_IGNORED_RESOURCES = ("object_store_memory",)
_IGNORED_PREFIXES = ("node:",)
#: Metadata key choosing the worker process: "fresh" (a new process per task) or "reuse"
#: (a warm process, the default for every task: saves a ~2.5 s worker start).
WORKER_METADATA_KEY = "taskray:worker"
#: How long the node list (which nodes exist, their totals and labels) is reused; what is
#: free on each node is read on every call.
NODES_TTL_S = 2.0

# Declared without GPUs on purpose: Ray gives a function declared with GPUs a new process
# for every call; set per call with .options(), the worker stays reusable, and the executor
# gives cached GPU memory back after each GPU task.
# Ray's stubs cannot type a function re-wrapped with options, hence Any.
_execute_in_warm_worker: Any = ray.remote(max_retries=0)(executor.execute_batch)
_execute_in_fresh_worker: Any = ray.remote(max_retries=0, max_calls=1)(executor.execute_batch)
_warm: Any = ray.remote(num_cpus=0, max_retries=0)(executor.warm)

_nodes_cache: tuple[float, list[dict[str, Any]]] | None = None
_agents: dict[tuple[str, str], Any] = {}
#: Ray namespace of taskray's named actors (the scheduler, the node agents).
NAMESPACE = "taskray"


def _database_key(database_url: str) -> str:
    """Which database, for actor names: a digest of the URL without its password (Ray
    shows actor names to anyone who can read its state, and a digest of a password can
    be checked against guesses)."""
    where = make_url(database_url).render_as_string(hide_password=True)
    return hashlib.sha256(where.encode()).hexdigest()[:12]


def agent_for(node_id: str, database_url: str) -> Any:
    """The node's agent (``taskray.node``), started on first use: executors on the node
    reach the store through it, so connections grow with nodes, not worker processes."""
    # One agent per node per database: two taskray deployments may share a Ray cluster.
    database = _database_key(database_url)
    agent = _agents.get((node_id, database))
    if agent is None:
        agent = _agents[(node_id, database)] = NodeAgent.options(
            name=f"taskray-node-{node_id}-{database}",
            namespace=NAMESPACE,
            get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        ).remote(database_url)
    return agent


@dataclass
class Warming:
    """A node's warm-up in flight."""

    node_id: str
    #: Everything it started (the agent's store opening included).
    refs: list[Any]
    #: The warm-up tasks that hold a GPU each until the node's GPU workers are all up.
    gpu_refs: list[Any]


def warm_node(
    node: NodeView, database_url: str, *, cpu_workers: int, gpu_workers: int, timeout_s: float
) -> Warming:
    """Start the node's agent with its store open, and ``cpu_workers`` + ``gpu_workers``
    worker processes with the executor imported, for lanes to reuse: a worker process
    takes seconds to start, and Ray never reuses a GPU task's process for CPU work or the
    other way round, so both kinds are started.

    Each kind waits at a barrier of its own (so Ray must start that many processes). CPU
    warm-up tasks reserve nothing; GPU ones hold a GPU each (Ray starts a GPU-kind process
    only for a task that asks for one) until the node's GPU workers are all up."""
    agent = agent_for(node.node_id, database_url)
    strategy = NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False)

    def start(count: int, gpus: int) -> list[Any]:
        group = uuid.uuid4().hex
        return [
            _warm.options(
                scheduling_strategy=strategy, num_gpus=gpus, name="taskray:warm-up"
            ).remote(agent, group, count, timeout_s)
            for _ in range(count)
        ]

    gpu_refs = start(gpu_workers, 1)
    return Warming(node.node_id, [agent.open.remote(), *gpu_refs, *start(cpu_workers, 0)], gpu_refs)


def unfinished(refs: Sequence[Any]) -> list[Any]:
    """Those of ``refs`` whose Ray task has not ended yet."""
    if not refs:
        return []
    _, rest = ray.wait(list(refs), num_returns=len(refs), timeout=0)
    return list(rest)


def settled(refs: Sequence[Any], timeout_s: float) -> bool:
    """Whether every ref has resolved (or failed) within ``timeout_s``."""
    if not refs:
        return True
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    return len(ready) == len(refs)


def stop_agents(database_url: str) -> None:
    """Stop the agents this process started for the database (the scheduler is stopping)."""
    database = _database_key(database_url)
    for key in [key for key in _agents if key[1] == database]:
        agent = _agents.pop(key)
        try:
            ray.kill(agent, no_restart=True)
        except Exception:  # already gone with its node
            log.debug("stopping a node agent failed", exc_info=True)


def forget_agents() -> None:
    """Look the agents up again (after a lane failed in Ray: its node or agent may be gone)."""
    _agents.clear()


def _alive_nodes() -> list[dict[str, Any]]:
    global _nodes_cache
    now = time.monotonic()
    if _nodes_cache is None or now - _nodes_cache[0] > NODES_TTL_S:
        nodes = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
        _nodes_cache = (now, nodes)
    return _nodes_cache[1]


def forget_nodes() -> None:
    """Read the node list afresh next time (a node died or joined)."""
    global _nodes_cache
    _nodes_cache = None


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
    for node in _alive_nodes():
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


def wants_fresh_worker(task: ReadyTask) -> bool:
    """Every task reuses warm workers unless it asks for a fresh process through its
    metadata (``worker="fresh"``): GPU tasks too, since the executor gives their cached
    GPU memory back after each one."""
    return bool(task.metadata.get(WORKER_METADATA_KEY) == "fresh")


@dataclass
class Lane:
    """One Ray task running leased tasks back to back on one node, as the scheduler
    tracks it. It holds the resources of one task (they all have the same shape)."""

    node_id: str
    ref: Any
    #: Lease of each task in the lane, in the order they run.
    leases: dict[uuid.UUID, uuid.UUID]
    task_type: str
    #: What it holds on its node, in Ray's names.
    resources: dict[str, float] = field(default_factory=dict)
    #: Dispatched beyond what the node had free: it waits in Ray for a slot there.
    ahead: bool = False
    #: The timeout of its one task, if it has one (a task with a timeout runs alone).
    timeout_s: float | None = None
    #: Set when the scheduler cancelled it (timeout, cancel); its end is then expected.
    stopped_because: str | None = None
    dispatched_at: float = field(default_factory=time.monotonic)


def dispatch(
    tasks: Sequence[ReadyTask],
    leases: Sequence[uuid.UUID],
    node_id: str,
    database_url: str,
    *,
    heartbeat_interval_s: float,
    lease_ttl_s: float,
    ahead: bool = False,
) -> Lane:
    """Start a lane of ``tasks`` (one resource shape) on ``node_id``, pinned there."""
    first = tasks[0]
    resources = first.resources
    options: dict[str, Any] = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        # Named after the task, so the Ray dashboard shows which task runs where.
        "name": f"taskray:{first.type}:{first.id}"
        + (f"+{len(tasks) - 1}" if len(tasks) > 1 else ""),
    }
    if resources.memory:
        options["memory"] = resources.memory
    if resources.custom:
        options["resources"] = dict(resources.custom)
    remote = _execute_in_fresh_worker if wants_fresh_worker(first) else _execute_in_warm_worker
    ref = remote.options(**options).remote(
        agent_for(node_id, database_url),
        [(str(t.id), str(lease)) for t, lease in zip(tasks, leases, strict=True)],
        heartbeat_interval_s,
        lease_ttl_s,
        resources.num_gpus > 0,
    )
    return Lane(
        node_id=node_id,
        ref=ref,
        leases={t.id: lease for t, lease in zip(tasks, leases, strict=True)},
        task_type=first.type,
        resources=resources.as_dict(),
        ahead=ahead,
    )


def finished(refs: Sequence[Any], timeout_s: float) -> list[Any]:
    """Those of ``refs`` whose Ray task has ended, waiting up to ``timeout_s`` for one."""
    if not refs:
        return []
    # Return at the first end (not after the timeout), then take whatever else has ended.
    ready, rest = ray.wait(list(refs), num_returns=1, timeout=timeout_s)
    if ready and rest:
        ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
    return list(ready)


def outcome(lane: Lane) -> tuple[list[tuple[str, str, float]] | None, str | None]:
    """(what the executor reported, or None) and (Ray's error, or None) for an ended lane."""
    try:
        return list(ray.get(lane.ref)), None
    except ray.exceptions.RayError as exc:
        # Worker crash, node death, out of memory, cancellation: the executor could not
        # report, so the scheduler records the attempts as failed.
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def cancel(lane: Lane, reason: str) -> None:
    lane.stopped_because = reason
    # force=True kills the worker process: a handler stuck in C code or a sleep stops too.
    ray.cancel(lane.ref, force=True)
