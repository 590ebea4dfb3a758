"""Retry and expiry (issue 3, section 4): pure functions of the attempt count and the time."""

from __future__ import annotations

import itertools

import pytest

from relay.retry import is_expired, next_attempt_at

SCHEDULE = [60.0, 300.0, 900.0, 1800.0, 3600.0]  # the example config's "1m" .. "1h"
NOW = 1_800_000_000.0
FAR = NOW + 10 * 86400


@pytest.mark.parametrize(
    ("attempts", "wait"),
    [(1, 60.0), (2, 300.0), (3, 900.0), (4, 1800.0), (5, 3600.0)],
)
def test_each_retry_waits_the_next_interval(attempts: int, wait: float) -> None:
    assert next_attempt_at(attempts=attempts, now=NOW, schedule=SCHEDULE, expires_at=FAR) == (
        NOW + wait
    )


@pytest.mark.parametrize("attempts", [6, 7, 50, 10_000])
def test_the_last_interval_repeats(attempts: int) -> None:
    result = next_attempt_at(attempts=attempts, now=NOW, schedule=SCHEDULE, expires_at=FAR)
    assert result == NOW + 3600.0


def test_zero_attempts_waits_the_first_interval() -> None:
    assert next_attempt_at(attempts=0, now=NOW, schedule=SCHEDULE, expires_at=FAR) == NOW + 60


def test_a_one_step_schedule_always_waits_that_step() -> None:
    for attempts in (1, 2, 3):
        assert next_attempt_at(attempts=attempts, now=NOW, schedule=[30.0], expires_at=FAR) == (
            NOW + 30
        )


def test_never_past_the_expiry() -> None:
    expires = NOW + 100
    assert next_attempt_at(attempts=3, now=NOW, schedule=SCHEDULE, expires_at=expires) == expires
    assert next_attempt_at(attempts=1, now=NOW, schedule=SCHEDULE, expires_at=expires) == NOW + 60


def test_the_whole_schedule_ends_exactly_at_the_expiry() -> None:
    """Walking the schedule from arrival reaches the 48 h expiry on time, never beyond."""
    expires = NOW + 48 * 3600
    now, attempts, times = NOW, 0, []
    while now < expires:
        attempts += 1
        now = next_attempt_at(attempts=attempts, now=now, schedule=SCHEDULE, expires_at=expires)
        times.append(now)
    assert times[:5] == [NOW + 60, NOW + 360, NOW + 1260, NOW + 3060, NOW + 6660]
    assert times[-1] == expires
    assert all(b - a <= 3600 for a, b in itertools.pairwise(times))


@pytest.mark.parametrize(
    ("now", "expired"), [(NOW - 1, False), (NOW - 0.001, False), (NOW, True), (NOW + 1, True)]
)
def test_is_expired_from_the_expiry_instant_on(now: float, expired: bool) -> None:
    assert is_expired(now=now, expires_at=NOW) is expired
