"""The values placement decisions are made over."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

#: Amounts below this count as zero (float noise from fractional CPUs and GPUs).
EPSILON = 1e-9
#: A task label with this prefix is a node selector: ``node:zone=a`` needs a node labelled
#: ``zone=a``. Other labels are tags and do not restrict placement.
NODE_SELECTOR_PREFIX = "node:"


@dataclass(frozen=True, slots=True)
class Release:
    """Resources a running task is expected to give back, and by when (e.g. its lease
    start plus its timeout: an upper bound, so backfill planned on it is safe)."""

    at: datetime
    resources: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class NodeView:
    """One alive node as the scheduler sees it, in Ray's resource names."""

    node_id: str
    #: Everything the node declares: CPU, GPU, memory (bytes), custom resources.
    total: Mapping[str, float]
    #: What is free now, net of what taskray has leased to the node.
    free: Mapping[str, float]
    labels: Mapping[str, str] = field(default_factory=dict)
    #: What running tasks will give back and when, where known; lets a lower-priority task
    #: use a reserved node if it ends before the reserving task could start (EASY backfill).
    releases: Sequence[Release] = ()

    @property
    def has_gpus(self) -> bool:
        return self.total.get("GPU", 0.0) > EPSILON


@dataclass(frozen=True, slots=True)
class TaskDemand:
    """One ready task: what it needs and how urgent it is."""

    task_id: uuid.UUID
    priority: int
    #: Resources in Ray's names (``Resources.as_dict()``); absent means zero.
    demand: Mapping[str, float]
    #: When it became ready to run (its scheduled_at): older waits first among equals.
    ready_since: datetime
    #: Node labels the task requires (from its ``node:``-prefixed labels).
    node_selector: Mapping[str, str] = field(default_factory=dict)
    #: An upper bound on how long it runs (its timeout), if known: lets it backfill a
    #: reserved node when it would end before the reserving task could start there.
    expected_duration_s: float | None = None

    @property
    def needs_gpu(self) -> bool:
        return self.demand.get("GPU", 0.0) > EPSILON


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    #: Ready tasks, highest priority first, then oldest.
    tasks: Sequence[TaskDemand]
    nodes: Sequence[NodeView]
    now: datetime


@dataclass(frozen=True, slots=True)
class Placement:
    task_id: uuid.UUID
    node_id: str


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    placements: list[Placement]
    #: Tasks that fit no node now but would fit an empty node of the cluster: they wait.
    waiting: list[uuid.UUID]
    #: Tasks that no node could hold even when empty (a missing resource or label).
    infeasible: list[uuid.UUID]
    #: Nodes held back for a waiting higher-priority task, so smaller tasks cannot starve it.
    reservations: Mapping[str, uuid.UUID] = field(default_factory=dict)
