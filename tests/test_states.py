"""The recipient state machine, pair by pair: every (state, event), the ones that change
nothing included, each with the reason it is so."""

from __future__ import annotations

import pytest

from relay.states import (
    FAILED_FINAL,
    FINAL,
    UNFINISHED,
    WAITING,
    Change,
    Event,
    Recipient,
    Status,
    sources,
    sql_in,
    step,
)

NOW = 1000.0
EXPIRES = 5000.0
RETRY_AT = 1060.0
S, E = Status, Event

# (state, event) -> (status afterwards or None for "no change", next attempt, why)
# The recipient has been tried once (attempts=1) and is due at 900 unless said otherwise.
TABLE: dict[tuple[Status, Event], tuple[Status | None, float | None, str]] = {}


def row(state: Status, event: Event, after: Status | None, next_at: float | None, why: str) -> None:
    TABLE[state, event] = (after, next_at, why)


for waiting in (S.QUEUED, S.DEFERRED):
    row(waiting, E.DELIVERED, S.DELIVERED, None, "an accepted attempt is final")
    row(waiting, E.TRANSIENT, S.DEFERRED, RETRY_AT, "tried again at the next interval")
    row(waiting, E.PERMANENT, S.FAILED, None, "a 5xx is final and owes an NDR")
    row(waiting, E.EXPIRY, S.EXPIRED, None, "out of time: final, owes an NDR")
    row(waiting, E.NOT_FOUND, S.FAILED, None, "Fix now: no such recipient, fails at once")
    row(waiting, E.HOLD, S.HELD, None, "held mail is not scheduled")
    row(waiting, E.RELEASE, None, None, "not held: nothing to release")
    row(waiting, E.EXPIRE_NOW, waiting, NOW, "expires at the next pass, which is now")
    row(waiting, E.RETRY_NOW, waiting, 900.0, "already due at 900: a retry never delays it")
    row(waiting, E.DELETE, waiting, None, "deleted whatever its state")
row(S.HELD, E.DELIVERED, None, None, "held while in flight: the hold wins, tried after release")
row(S.HELD, E.TRANSIENT, None, None, "held while in flight: the hold wins")
row(S.HELD, E.PERMANENT, None, None, "held while in flight: the hold wins")
row(S.HELD, E.EXPIRY, None, None, "held mail does not expire until released")
row(S.HELD, E.NOT_FOUND, None, None, "held mail is not looked at until released")
row(S.HELD, E.HOLD, None, None, "already held")
row(S.HELD, E.RELEASE, S.DEFERRED, NOW, "tried before, so deferred, and due now")
row(S.HELD, E.EXPIRE_NOW, S.DEFERRED, NOW, "expiring by hand beats a hold")
row(S.HELD, E.RETRY_NOW, None, None, "held mail is not tried: release it first")
row(S.HELD, E.DELETE, S.HELD, None, "deleted whatever its state")
for final in (S.DELIVERED, S.FAILED, S.EXPIRED):
    for event in Event:
        if event is not E.DELETE:
            row(final, event, None, None, "final: only the retention purge removes it")
    row(final, E.DELETE, final, None, "deleted whatever its state")


def test_the_table_covers_every_pair() -> None:
    assert set(TABLE) == {(s, e) for s in Status for e in Event}


@pytest.mark.parametrize(("state", "event"), list(TABLE), ids=lambda v: str(v))
def test_each_pair(state: Status, event: Event) -> None:
    after, next_at, why = TABLE[state, event]
    change = step(Recipient(state, 1, 900.0, EXPIRES), event, NOW, retry_at=RETRY_AT)
    if after is None:
        assert change is None, why
        return
    assert change is not None, why
    assert change.status is after, why
    assert change.next_attempt_at == next_at, why
    assert change.deleted is (event is E.DELETE), why
    assert change.attempted is (event in (E.DELIVERED, E.TRANSIENT, E.PERMANENT)), why
    assert change.ndr_owed is (after in FAILED_FINAL and event is not E.DELETE), why


def test_release_of_mail_never_tried_makes_it_queued_again() -> None:
    change = step(Recipient(S.HELD, 0, None, EXPIRES), E.RELEASE, NOW)
    assert change == Change(S.QUEUED, NOW)


def test_expire_now_moves_the_expiry() -> None:
    change = step(Recipient(S.DEFERRED, 2, 2000.0, EXPIRES), E.EXPIRE_NOW, NOW)
    assert change is not None and change.expires_at == NOW and change.next_attempt_at == NOW


def test_a_retry_is_never_later_than_the_expiry() -> None:
    change = step(Recipient(S.DEFERRED, 3, 900.0, 1030.0), E.TRANSIENT, NOW, retry_at=RETRY_AT)
    assert change is not None and change.next_attempt_at == 1030.0


def test_retry_now_brings_a_later_attempt_forward() -> None:
    change = step(Recipient(S.DEFERRED, 1, 4000.0, EXPIRES), E.RETRY_NOW, NOW)
    assert change == Change(S.DEFERRED, NOW)


def test_a_transient_failure_needs_its_next_attempt() -> None:
    with pytest.raises(ValueError, match="next attempt"):
        step(Recipient(S.QUEUED, 0, NOW, EXPIRES), E.TRANSIENT, NOW)


def test_the_sets_are_derived_from_each_other() -> None:
    assert WAITING < UNFINISHED
    assert FAILED_FINAL < FINAL
    assert set(Status) == UNFINISHED | FINAL
    assert not UNFINISHED & FINAL


def test_sources_are_what_the_table_says() -> None:
    for event in Event:
        expected = {s for s in Status if TABLE[s, event][0] is not None}
        assert sources(event) == expected, event
    assert sources(E.HOLD) == WAITING
    assert sources(E.EXPIRE_NOW) == UNFINISHED


def test_sql_lists_are_written_from_the_sets() -> None:
    assert sql_in(WAITING) == "('deferred', 'queued')"
    assert sql_in(frozenset()) == "()"
