"""The one source of "now": wall time plus the lab's offset, movable by tests and `relay clock`."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime


class Clock:
    """Epoch seconds from `source` plus `offset`; listeners hear about every jump.

    The delivery worker sleeps until the next due time; when the lab moves the clock
    forward it must wake at once, so setting the offset notifies listeners.
    """

    def __init__(self, *, offset: float = 0.0, source: Callable[[], float] = time.time) -> None:
        self._source = source
        self._offset = offset
        self._listeners: list[Callable[[], None]] = []

    def now(self) -> float:
        return self._source() + self._offset

    @property
    def offset(self) -> float:
        return self._offset

    @offset.setter
    def offset(self, value: float) -> None:
        if value != self._offset:
            self._offset = value
            self._changed()

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()


class ManualClock(Clock):
    """A clock that only moves when told to: tests advance it instead of sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        super().__init__(source=lambda: self._now)

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._changed()


def iso(timestamp: float | None) -> str | None:
    """ISO 8601 in UTC with a Z, second precision: how every time leaves the relay."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_datetime(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)
