"""The recipient state machine: every state a recipient can be in, and what each event does.

Pure. `step(recipient, event, now)` answers "what happens to a recipient after X" for every
X, and returns the change to write, or None when the event does not apply in that state
(releasing a delivered recipient, holding an expired one). The spool writes changes; it
decides none (shared/DESIGN.md). The SQL that selects recipients by state is written from
the named sets below, never from status literals (`sql_in`).

    queued ──attempt──► delivered                      (final)
       │                failed     (5xx, or Fix now)   (final, NDR owed)
       │                deferred ──next interval──► attempt again
       │                             └─ now ≥ expires_at ─► expired (final, NDR owed)
       └── hold ◄──► release  (held: neither tried nor expired)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    """Per-recipient delivery state, stored as text."""

    QUEUED = "queued"  # not tried yet
    DEFERRED = "deferred"  # tried, failed for now, waits for its next interval
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    HELD = "held"  # Postfix's hold queue: neither tried nor expired until released


# Tried when their next attempt falls due (and expired then, once past their expiry).
WAITING = frozenset({Status.QUEUED, Status.DEFERRED})
# Still in the queue: what the digest, the alerts and `queue list` count.
UNFINISHED = WAITING | {Status.HELD}
# Final, and the sender is owed an NDR.
FAILED_FINAL = frozenset({Status.FAILED, Status.EXPIRED})
# Nothing changes them any more but the retention purge.
FINAL = FAILED_FINAL | {Status.DELIVERED}
assert set(Status) == UNFINISHED | FINAL and not UNFINISHED & FINAL


class Event(StrEnum):
    """What can happen to a recipient."""

    DELIVERED = "delivered"  # an attempt: the destination accepted it, or the mailbox has it
    TRANSIENT = "transient"  # an attempt failed for now (4xx, a mail flow code)
    PERMANENT = "permanent"  # an attempt failed for good (5xx)
    EXPIRY = "expiry"  # due again, but the message's time is up
    NOT_FOUND = "not-found"  # Fix now: its domain became authoritative and it does not exist
    HOLD = "hold"  # relay queue hold
    RELEASE = "release"  # relay queue release
    EXPIRE_NOW = "expire-now"  # relay queue expire: the next pass expires it
    RETRY_NOW = "retry-now"  # relay queue retry, a connector enabled or back, Fix now
    DELETE = "delete"  # relay queue delete: gone, without an NDR


# The events that are delivery attempts' results, and the ones that end a recipient
# without a new attempt (the worker's give-up), each carrying the error to record.
ATTEMPTS = frozenset({Event.DELIVERED, Event.TRANSIENT, Event.PERMANENT})
GIVE_UPS = frozenset({Event.EXPIRY, Event.NOT_FOUND})


@dataclass(frozen=True, slots=True)
class Recipient:
    """The part of a recipient that the machine reads."""

    status: Status
    attempts: int
    next_attempt_at: float | None
    expires_at: float


@dataclass(frozen=True, slots=True)
class Change:
    """What to write for one recipient. `next_attempt_at` None: not scheduled."""

    status: Status
    next_attempt_at: float | None
    attempted: bool = False  # one more attempt to count
    expires_at: float | None = None  # a new expiry (expire now), else unchanged
    deleted: bool = False

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def ndr_owed(self) -> bool:
        """The sender is owed an NDR for it (the bounce step sends it and clears the flag)."""
        return self.status in FAILED_FINAL and not self.deleted


def step(
    recipient: Recipient, event: Event, now: float, *, retry_at: float | None = None
) -> Change | None:
    """The change `event` makes to `recipient` at `now`; None when it makes none.

    `retry_at` is when a TRANSIENT failure is tried again (relay.retry's schedule); it is
    never later than the expiry, so the last retry is the one that expires it.
    """
    status = recipient.status
    if event is Event.DELETE:
        return Change(status, None, deleted=True)
    if status in FINAL:
        return None  # finished: only the retention purge removes it
    if event is Event.RELEASE:
        if status is not Status.HELD:
            return None  # not held: nothing to release
        return Change(_unheld(recipient), now)
    if event is Event.EXPIRE_NOW:
        # Held mail too: expiring by hand means "give up now", which a hold cannot stop.
        return Change(_unheld(recipient), now, expires_at=now)
    if status is Status.HELD:
        # Neither tried nor expired while held; a result of an attempt that was in flight
        # when it was held is dropped, and it is tried again after release.
        return None
    # status is queued or deferred from here on
    if event is Event.HOLD:
        return Change(Status.HELD, None)
    if event is Event.RETRY_NOW:
        # Never later than it already was: a retry request does not delay mail already due.
        due = now if recipient.next_attempt_at is None else min(recipient.next_attempt_at, now)
        return Change(status, due)
    if event is Event.DELIVERED:
        return Change(Status.DELIVERED, None, attempted=True)
    if event is Event.PERMANENT:
        return Change(Status.FAILED, None, attempted=True)
    if event is Event.TRANSIENT:
        if retry_at is None:
            raise ValueError("a transient failure needs the time of its next attempt")
        return Change(Status.DEFERRED, min(retry_at, recipient.expires_at), attempted=True)
    if event is Event.EXPIRY:
        return Change(Status.EXPIRED, None)
    if event is Event.NOT_FOUND:
        return Change(Status.FAILED, None)
    raise AssertionError(f"unhandled event {event}")  # pragma: no cover - Event is closed


def _unheld(recipient: Recipient) -> Status:
    if recipient.status is not Status.HELD:
        return recipient.status
    return Status.DEFERRED if recipient.attempts > 0 else Status.QUEUED


def sources(event: Event) -> frozenset[Status]:
    """The states in which `event` changes anything: the WHERE clause of set-wide updates."""
    probe = {s: Recipient(s, 0, 0.0, 1.0) for s in Status}
    return frozenset(s for s, r in probe.items() if step(r, event, 0.5, retry_at=0.6) is not None)


def sql_in(statuses: frozenset[Status]) -> str:
    """`('deferred', 'queued')`: a status set for an SQL IN clause (the values are ours)."""
    return "(" + ", ".join(f"'{s.value}'" for s in sorted(statuses)) + ")"
