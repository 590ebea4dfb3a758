"""How the worker splits a route's due mail across parallel connections (relay.worker._chunks):
interleaved, so the destination sees it close to arrival order (issue 6, section 3)."""

from __future__ import annotations

from relay.routing import Route, RouteKind
from relay.spool.rows import RecipientRow
from relay.states import Status
from relay.worker import _chunks, _Item

ROUTE = Route(RouteKind.MX, "example.test")


def _item(rid: int, message: int) -> _Item:
    row = RecipientRow(
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
    return _Item(row, ROUTE)


def _messages(chunk: list[_Item]) -> list[int]:
    seen: list[int] = []
    for item in chunk:
        if not seen or seen[-1] != item.row.message:
            seen.append(item.row.message)
    return seen


def test_parts_interleave_in_arrival_order() -> None:
    items = [_item(rid=m, message=m) for m in range(1, 501)]
    items.reverse()  # whatever order the query gave: arrival order is by message id
    chunks = _chunks(items, 50)
    assert len(chunks) == 10  # ceil(500 / 50)
    assert [_messages(c) for c in chunks] == [list(range(j, 501, 10)) for j in range(1, 11)]
    # Ten connections at the same pace: the k-th message of every part arrive together,
    # so the destination's order is off by less than the number of parts.
    rounds = [m for k in range(50) for m in sorted(c[k].row.message for c in chunks)]
    assert rounds == list(range(1, 501))


def test_a_message_and_its_recipients_stay_in_one_part() -> None:
    items = [_item(rid=10 * m + r, message=m) for m in range(1, 121) for r in range(3)]
    chunks = _chunks(items, 50)
    assert len(chunks) == 3  # ceil(120 / 50)
    for chunk in chunks:
        messages = _messages(chunk)
        assert messages == sorted(messages)
        for m in messages:
            assert [i.row.id for i in chunk if i.row.message == m] == [
                10 * m,
                10 * m + 1,
                10 * m + 2,
            ]
    assert sorted(m for c in chunks for m in _messages(c)) == list(range(1, 121))


def test_few_messages_take_one_connection() -> None:
    chunks = _chunks([_item(rid=m, message=m) for m in (3, 1, 2)], 50)
    assert [_messages(c) for c in chunks] == [[1, 2, 3]]
    assert _chunks([], 50) == []
