"""The pure parts of the task record: validation and the retry rule."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskray.errors import InvalidResourcesError, InvalidTaskError
from taskray.models import (
    TERMINAL_STATES,
    TRANSITIONS,
    DeadLetter,
    Resources,
    RetryAfter,
    RetryPolicy,
    TaskState,
)


@given(
    base=st.floats(0, 100),
    extra=st.floats(0, 1000),
    jitter=st.floats(0, 1),
    retry_number=st.integers(1, 200),
    unit=st.floats(0, 1, exclude_max=True),
)
def test_backoff_is_bounded_and_grows(
    base: float, extra: float, jitter: float, retry_number: int, unit: float
) -> None:
    policy = RetryPolicy(
        max_retries=1000, backoff_base_s=base, backoff_cap_s=base + extra, jitter=jitter
    )
    delay = policy.backoff_s(retry_number, unit)
    ceiling = min(policy.backoff_cap_s, base * 2.0 ** (retry_number - 1))
    assert math.isfinite(delay)
    assert ceiling * (1 - jitter) - 1e-9 <= delay <= ceiling + 1e-9
    # Without jitter the delay never shrinks from one retry to the next.
    steady = RetryPolicy(1000, base, base + extra, 0.0)
    assert steady.backoff_s(retry_number + 1, unit) >= steady.backoff_s(retry_number, unit)


@given(max_retries=st.integers(0, 20), attempts=st.integers(1, 40), retryable=st.booleans())
def test_decide_retries_until_the_budget_is_spent(
    max_retries: int, attempts: int, retryable: bool
) -> None:
    decision = RetryPolicy(max_retries=max_retries, jitter=0).decide(attempts, retryable, 0.5)
    if retryable and attempts <= max_retries:
        assert isinstance(decision, RetryAfter) and decision.delay_s >= 0
    else:
        assert isinstance(decision, DeadLetter)
        assert ("non-retryable" in decision.reason) == (not retryable)


@pytest.mark.parametrize(
    "resources",
    [
        Resources(num_cpus=-0.5),
        Resources(num_cpus=math.inf),
        Resources(num_gpus=2.5),
        Resources(memory=1.5),  # type: ignore[arg-type]
        Resources(custom={"": 1}),
        Resources(custom={"memory": 1}),
        Resources(custom={"tpu": -1}),
        Resources(num_cpus=True),
    ],
)
def test_invalid_resources_are_refused(resources: Resources) -> None:
    with pytest.raises(InvalidResourcesError):
        resources.validate()


def test_resource_vector_uses_ray_names() -> None:
    vector = (
        Resources(num_cpus=2, num_gpus=0.5, memory=1 << 30, custom={"accel": 1})
        .validate()
        .as_dict()
    )
    assert vector == {"CPU": 2.0, "GPU": 0.5, "memory": float(1 << 30), "accel": 1.0}
    assert Resources(num_cpus=0).as_dict() == {}


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(max_retries=-1),
        RetryPolicy(backoff_base_s=5, backoff_cap_s=1),
        RetryPolicy(jitter=2),
    ],
)
def test_invalid_retry_policy_is_refused(policy: RetryPolicy) -> None:
    with pytest.raises(InvalidTaskError):
        policy.validate()


def test_terminal_states_lead_nowhere_but_replay() -> None:
    for state in TERMINAL_STATES:
        assert TRANSITIONS[state] <= {TaskState.QUEUED, TaskState.BLOCKED}
    assert all(state in TRANSITIONS for state in TaskState)
