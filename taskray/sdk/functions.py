"""``@taskray.task``: Python functions as durable, resource-aware tasks."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Generic, ParamSpec, TypeVar, overload

from tqdm.auto import tqdm

from taskray import serialization
from taskray.errors import InvalidResourcesError, InvalidTaskError
from taskray.executor import RETRY_ON_METADATA_KEY
from taskray.models import DEFAULT_QUEUE, Encoding, Resources, RetryPolicy, TaskSpec
from taskray.scheduler.cluster import WORKER_METADATA_KEY
from taskray.sdk import runtime
from taskray.sdk.handles import HandleList, TaskHandle
from taskray.sdk.units import parse_duration, parse_memory

P = ParamSpec("P")
R = TypeVar("R")

#: Show a progress bar when ``map`` prepares at least this many tasks.
_MAP_PROGRESS_MIN = 100


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """Everything ``@taskray.task(...)`` and ``.options(...)`` accept."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | float | str | None = None
    resources: Mapping[str, float] | None = None
    priority: int = 0
    queue: str = DEFAULT_QUEUE
    max_retries: int = 3
    #: Seconds before the first retry, or (first, cap): the delay doubles per retry.
    retry_backoff: float | tuple[float, float] = (1.0, 300.0)
    timeout: float | str | timedelta | None = None
    #: Exception classes worth a retry; any other exception dead-letters at once.
    retry_on: Sequence[type[BaseException]] | None = None
    #: A string, or a function of the call's arguments that returns one.
    idempotency_key: str | Callable[..., str] | None = None
    delay: float | str | timedelta | None = None
    labels: Mapping[str, str] | None = None
    metadata: Mapping[str, Any] | None = None
    #: "fresh" runs each call in a new worker process (GPU memory is freed), "reuse" keeps
    #: warm workers (no ~2.5 s start); None: fresh for GPU tasks, reuse for others.
    worker: str | None = None
    tenant: str = "default"

    def merged(self, overrides: Mapping[str, Any]) -> TaskOptions:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidTaskError(f"unknown task option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **overrides)

    def retry_policy(self) -> RetryPolicy:
        if isinstance(self.retry_backoff, tuple):
            base, cap = self.retry_backoff
        else:
            base = float(self.retry_backoff)
            cap = max(300.0, base)
        return RetryPolicy(max_retries=self.max_retries, backoff_base_s=base, backoff_cap_s=cap)

    def resource_request(self) -> Resources:
        return Resources(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            memory=parse_memory(self.memory),
            custom=dict(self.resources or {}),
        ).validate()


def _collect_upstreams(value: Any, found: list[TaskHandle]) -> Any:
    """Replace handles inside ``value`` (lists, tuples, dicts) by upstream-result markers."""

    def marker(handle: TaskHandle) -> serialization.UpstreamResult:
        found.append(handle)
        return serialization.UpstreamResult(handle.id)

    return serialization.replace_instances(value, TaskHandle, marker)


def _check_fits_somewhere(resources: Resources) -> None:
    """Refuse at submit what no node of the cluster could ever hold (DESIGN invariant 6).

    The cluster view is cached for a few seconds; a task that does not fit it is checked
    once more against a fresh view (a node may have just joined) before it is refused."""
    demand = resources.as_dict()
    rt = runtime.current()

    def fits(nodes: list[dict[str, float]]) -> bool:
        return any(all(node.get(k, 0.0) >= v for k, v in demand.items()) for node in nodes)

    if fits(rt.node_totals()):
        return
    nodes = rt.node_totals(max_age_s=0.0)
    if fits(nodes):
        return
    lacking = sorted(k for k in demand if not any(k in node for node in nodes))
    if lacking:
        raise InvalidResourcesError(f"no node in this cluster has resource(s) {', '.join(lacking)}")
    raise InvalidResourcesError(f"no node in this cluster is large enough for {demand}")


def build_spec(
    task_type: str,
    options: TaskOptions,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    after: Sequence[TaskHandle] = (),
) -> TaskSpec:
    upstreams: list[TaskHandle] = list(after)
    call_args = _collect_upstreams(args, upstreams)
    call_kwargs = _collect_upstreams(kwargs, upstreams)
    key = options.idempotency_key
    if callable(key):
        key = key(*args, **kwargs)
    metadata = dict(options.metadata or {})
    if options.retry_on is not None:
        metadata[RETRY_ON_METADATA_KEY] = [
            f"{cls.__module__}.{cls.__qualname__}" for cls in options.retry_on
        ]
    if options.worker is not None:
        if options.worker not in ("fresh", "reuse"):
            raise InvalidTaskError(f"worker must be 'fresh' or 'reuse', got {options.worker!r}")
        metadata[WORKER_METADATA_KEY] = options.worker
    resources = options.resource_request()
    rt = runtime.current()
    if rt.remote:
        # The API never accepts pickles (workers would unpickle them): JSON only.
        payload: Any = serialization.encode_json_call(call_args, call_kwargs)
        encoding = Encoding.JSON
    else:
        _check_fits_somewhere(resources)
        payload = serialization.encode_call(call_args, call_kwargs)
        encoding = Encoding.PICKLE
    return TaskSpec(
        type=task_type,
        payload=payload,
        queue=options.queue,
        tenant=options.tenant,
        priority=options.priority,
        delay_s=parse_duration(options.delay) or 0.0,
        timeout_s=parse_duration(options.timeout),
        retry=options.retry_policy(),
        resources=resources,
        depends_on=list(dict.fromkeys(h.id for h in upstreams)),
        idempotency_key=key,
        labels=dict(options.labels or {}),
        metadata=metadata,
        encoding=encoding,
    )


def _submit_specs(specs: list[TaskSpec]) -> list[TaskHandle]:
    current = runtime.current()
    results = current.store.submit_many(specs)
    current.work_submitted()
    return [TaskHandle(r.task.id, r.task.type, r.deduplicated) for r in results]


def _is_importable(function: Callable[..., Any]) -> bool:
    module = inspect.getmodule(function)
    return (
        module is not None
        and module.__name__ != "__main__"
        and "<locals>" not in function.__qualname__
        and "<lambda>" not in function.__qualname__
        and getattr(module, function.__qualname__.split(".")[0], None) is not None
    )


class TaskFunction(Generic[P, R]):
    """A function that runs as a taskray task: ``f.submit(...)`` returns a ``TaskHandle``.

    Calling ``f(...)`` directly still runs it here, synchronously, like the plain function.
    """

    #: Marks a task (:mod:`taskray.registry`): one defined in a deployment's task module
    #: runs by name, from the REST API too.
    __taskray_task__ = True

    def __init__(self, function: Callable[P, R], options: TaskOptions) -> None:
        self.function = function
        self._options = options
        self._task_type: str | None = None
        functools.update_wrapper(self, function)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<taskray task {self.function.__module__}.{self.function.__qualname__}>"

    @property
    def task_type(self) -> str:
        """``module:function`` when workers can import it; otherwise the function ships by
        value (cloudpickle), stored once per content, so re-running a notebook cell that
        defines it does not pile up copies.

        Either way a client holding the database registers the function in the store, so
        its tasks run whether or not the deployment lists its module: this client is
        trusted (it could ship any code by value). An importable function is pickled by
        reference there, a few bytes that name it. Over the REST API the deployment's
        task modules alone decide."""
        if self._task_type is None:
            fn = self.function
            if _is_importable(fn):
                task_type = f"{fn.__module__}:{fn.__qualname__}"
                current = runtime.current()
                if not current.remote:
                    current.store.put_function(
                        serialization.registration_digest(task_type),
                        task_type,
                        serialization.dumps(fn),
                    )
                self._task_type = task_type
            else:
                blob = serialization.dumps(fn)
                digest = serialization.function_digest(blob)
                self._task_type = serialization.pickled_type(fn.__qualname__, digest)
                runtime.current().store.put_function(digest, fn.__qualname__, blob)
        return self._task_type

    def options(self, **overrides: Any) -> TaskFunction[P, R]:
        """The same function with some options changed, for the next submits."""
        changed = TaskFunction(self.function, self._options.merged(overrides))
        changed._task_type = self._task_type
        return changed

    def submit(self, *args: Any, **kwargs: Any) -> TaskHandle:
        """Submit one call. Handles among the arguments become upstream tasks; the function
        receives their results in their place. ``after=[...]`` orders without passing data."""
        after = kwargs.pop("after", ())
        spec = build_spec(self.task_type, self._options, args, kwargs, after)
        return _submit_specs([spec])[0]

    def map(self, items: Iterable[Any], *, progress: bool | None = None) -> HandleList:
        """Submit one call per item in a single bulk transaction."""
        values = list(items)
        show = len(values) >= _MAP_PROGRESS_MIN if progress is None else progress
        task_type = self.task_type
        specs = [
            build_spec(task_type, self._options, (value,), {})
            for value in tqdm(values, desc="preparing", unit="task", disable=not show)
        ]
        return HandleList(_submit_specs(specs))


@overload
def task(function: Callable[P, R], /) -> TaskFunction[P, R]: ...


@overload
def task(
    function: None = None, /, **options: Any
) -> Callable[[Callable[P, R]], TaskFunction[P, R]]: ...


def task(
    function: Callable[P, R] | None = None, /, **options: Any
) -> TaskFunction[P, R] | Callable[[Callable[P, R]], TaskFunction[P, R]]:
    """Make ``function`` a taskray task; ``@taskray.task`` or ``@taskray.task(num_gpus=1, ...)``."""
    base = TaskOptions().merged(options)

    def wrap(fn: Callable[P, R]) -> TaskFunction[P, R]:
        return TaskFunction(fn, base)

    return wrap(function) if function is not None else wrap


def submit(task_type: str, *args: Any, **kwargs: Any) -> TaskHandle:
    """Submit a task by name (``"module:function"``); ``options={...}`` sets task options."""
    options = TaskOptions().merged(kwargs.pop("options", {}) or {})
    after = kwargs.pop("after", ())
    return _submit_specs([build_spec(task_type, options, args, kwargs, after)])[0]
