"""Retry and expiry: when a deferred recipient is tried next, and when it gives up. Pure."""

from __future__ import annotations

from collections.abc import Sequence


def next_attempt_at(
    *, attempts: int, now: float, schedule: Sequence[float], expires_at: float
) -> float:
    """After `attempts` failed tries, the time of the next one.

    The n-th retry waits schedule[n-1]; the last interval repeats until expiry. Never later
    than the expiry itself, so the recipient expires on time (the seed's 48 hours).
    """
    index = min(max(attempts, 1), len(schedule)) - 1
    return min(now + schedule[index], expires_at)


def is_expired(*, now: float, expires_at: float) -> bool:
    return now >= expires_at
