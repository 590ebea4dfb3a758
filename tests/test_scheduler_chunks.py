"""How the scheduler splits a route's due mail across parallel connections
(relay.qmgr.chunks): interleaved, so the destination sees it close to arrival order
(issue 6, section 3)."""

from __future__ import annotations

from relay.qmgr import chunks
from relay.spool.rows import RecipientRow
from relay.states import Status


def _row(rid: int, message: int) -> RecipientRow:
    return RecipientRow(
        id=rid,
        message=message,
        address=f"r{rid}@example.test",
        status=Status.QUEUED,
        connector="mx",
        attempts=0,
        next_attempt_at=0.0,
        expires_at=1.0,
        delivered_at=None,
        last_error=None,
    )


def _messages(chunk: list[RecipientRow]) -> list[int]:
    seen: list[int] = []
    for row in chunk:
        if not seen or seen[-1] != row.message:
            seen.append(row.message)
    return seen


def test_parts_interleave_in_arrival_order() -> None:
    rows = [_row(rid=m, message=m) for m in range(1, 501)]
    rows.reverse()  # whatever order the query gave: arrival order is by message id
    parts = chunks(rows, 50)
    assert len(parts) == 10  # ceil(500 / 50)
    assert [_messages(c) for c in parts] == [list(range(j, 501, 10)) for j in range(1, 11)]
    # Ten connections at the same pace: the k-th message of every part arrive together,
    # so the destination's order is off by less than the number of parts.
    rounds = [m for k in range(50) for m in sorted(c[k].message for c in parts)]
    assert rounds == list(range(1, 501))


def test_a_message_and_its_recipients_stay_in_one_part() -> None:
    rows = [_row(rid=10 * m + r, message=m) for m in range(1, 121) for r in range(3)]
    parts = chunks(rows, 50)
    assert len(parts) == 3  # ceil(120 / 50)
    for chunk in parts:
        messages = _messages(chunk)
        assert messages == sorted(messages)
        for m in messages:
            assert [r.id for r in chunk if r.message == m] == [
                10 * m,
                10 * m + 1,
                10 * m + 2,
            ]
    assert sorted(m for c in parts for m in _messages(c)) == list(range(1, 121))


def test_few_messages_take_one_connection() -> None:
    parts = chunks([_row(rid=m, message=m) for m in (3, 1, 2)], 50)
    assert [_messages(c) for c in parts] == [[1, 2, 3]]
    assert chunks([], 50) == []
