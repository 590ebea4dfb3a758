"""The spool's own contract, over every backend (the `spool` fixture): an administrator's
change is exactly what `relay.states.step` decides for each selected recipient, and the
runtime settings come back as the typed values they were written as.

No relay, no sockets: messages are queued with `enqueue` and put into each state with
`record`, the way the queue manager writes results.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from relay.config import DomainType
from relay.spool.protocol import Spool
from relay.spool.rows import NewMessage, NewRecipient, RecipientRow, Result
from relay.spool.settings import ALERT_NOTIFIED, CLOCK_OFFSET, CONNECTOR_ENABLED, DOMAIN_TYPE
from relay.states import FINAL, Change, Event, Status, step

T0 = 1_800_000_000.0
EXPIRY = T0 + 48 * 3600
NOW = T0 + 600
PARTNER = "Partner"
ADMIN_EVENTS = (Event.HOLD, Event.RELEASE, Event.EXPIRE_NOW, Event.RETRY_NOW)


async def queue(spool: Spool, *recipients: str | tuple[str, str]) -> int:
    """One message for these recipients (an address, or an address and its connector)."""
    queue_id = spool.reserve_id()
    await spool.enqueue(
        NewMessage(
            id=queue_id,
            message_id=f"<{queue_id}@spool.test>",
            mail_from="sender@fabrikam.test",
            subject=f"message {queue_id}",
            received_at=T0,
            expires_at=EXPIRY,
            client_address="127.0.0.1",
            client_helo="client.fabrikam.test",
            recipients=[
                NewRecipient(r) if isinstance(r, str) else NewRecipient(r[0], r[1])
                for r in recipients
            ],
            content=b"Subject: test\r\n\r\nbody\r\n",
        )
    )
    return queue_id


async def rows(spool: Spool, message: int) -> list[RecipientRow]:
    found = await spool.get_message(message)
    assert found is not None
    return found.recipients


async def put(spool: Spool, row: RecipientRow, *changes: Change) -> None:
    """Write `changes` to a recipient one after the other, as results of the queue manager."""
    was = row.status
    for change in changes:
        await spool.record([Result(row.id, was, change, T0 + 60, row.connector)])
        was = change.status


DEFERRED = Change(Status.DEFERRED, T0 + 900, attempted=True)
HELD = Change(Status.HELD, None)


async def one_in_each_state(spool: Spool) -> int:
    """A message with a recipient in every state; two held ones, tried and never tried."""
    message = await queue(spool, *(f"{name}@partner.test" for name in _STATES))
    for row in await rows(spool, message):
        await put(spool, row, *_STATES[row.address.partition("@")[0]])
    return message


_STATES: dict[str, Sequence[Change]] = {
    "queued": (),
    "deferred": (DEFERRED,),
    "held-tried": (DEFERRED, HELD),
    "held-new": (HELD,),
    "delivered": (Change(Status.DELIVERED, None, attempted=True),),
    "failed": (Change(Status.FAILED, None, attempted=True),),
    "expired": (DEFERRED, Change(Status.EXPIRED, None)),
}


# ---- change: exactly what step decides ----------------------------------------------------


@pytest.mark.parametrize("event", ADMIN_EVENTS, ids=lambda e: e.value)
async def test_change_writes_what_step_decides_for_every_state(spool: Spool, event: Event) -> None:
    message = await one_in_each_state(spool)
    other = await queue(spool, "bystander@partner.test")
    before = await rows(spool, message)
    assert {r.status for r in before} == set(Status)

    changed = await spool.change(event, now=NOW, message=message)

    decided = {r.id: step(r.state, event, NOW) for r in before}
    assert changed == sum(1 for c in decided.values() if c is not None)
    for old, new in zip(before, await rows(spool, message), strict=True):
        change = decided[old.id]
        if change is None:  # the event does not apply in that state: nothing moves
            assert new == old, old.address
            continue
        assert new.status is change.status, old.address
        assert new.next_attempt_at == change.next_attempt_at, old.address
        assert new.expires_at == (change.expires_at or old.expires_at), old.address
        assert (new.attempts, new.last_error, new.ndr_due) == (old.attempts, old.last_error, False)
    (untouched,) = await rows(spool, other)
    assert (untouched.status, untouched.next_attempt_at) == (Status.QUEUED, T0)


async def test_hold_release_round_trip_keeps_whether_it_was_tried(spool: Spool) -> None:
    message = await queue(spool, "new@partner.test", "tried@partner.test")
    await put(spool, (await rows(spool, message))[1], DEFERRED)
    assert await spool.change(Event.HOLD, now=NOW, message=message) == 2
    assert [(r.status, r.next_attempt_at) for r in await rows(spool, message)] == [
        (Status.HELD, None),
        (Status.HELD, None),
    ]
    assert await spool.change(Event.HOLD, now=NOW, message=message) == 0  # held already
    assert await spool.change(Event.RELEASE, now=NOW, message=message) == 2
    assert [(r.status, r.next_attempt_at) for r in await rows(spool, message)] == [
        (Status.QUEUED, NOW),
        (Status.DEFERRED, NOW),
    ]
    assert await spool.change(Event.RELEASE, now=NOW, message=message) == 0  # not held


async def test_a_result_decided_before_a_hold_is_not_written(spool: Spool) -> None:
    """The queue manager's result is guarded by the state it was decided from: mail held
    while its attempt was in flight stays held."""
    message = await queue(spool, "u@partner.test")
    (row,) = await rows(spool, message)
    await spool.change(Event.HOLD, now=NOW, message=message)
    await put(spool, row, Change(Status.DELIVERED, None, attempted=True))
    (after,) = await rows(spool, message)
    assert (after.status, after.attempts) == (Status.HELD, 0)


async def test_retry_now_is_never_later_than_it_was(spool: Spool) -> None:
    """A retry makes waiting mail due now; mail due earlier keeps its place in the queue."""
    message = await queue(spool, "early@partner.test", "later@partner.test", "held@partner.test")
    _early, later, held = await rows(spool, message)
    await put(spool, later, DEFERRED)  # due at T0 + 900, after NOW
    await put(spool, held, HELD)
    assert await spool.change(Event.RETRY_NOW, now=NOW, message=message) == 2
    assert [(r.status, r.next_attempt_at) for r in await rows(spool, message)] == [
        (Status.QUEUED, T0),  # due since T0: stays T0
        (Status.DEFERRED, NOW),
        (Status.HELD, None),  # held mail waits for its release
    ]


async def test_retry_selects_all_one_message_or_one_connector(spool: Spool) -> None:
    a = await queue(spool, ("a1@partner.test", PARTNER), ("a2@onprem.test", "On-premises"))
    b = await queue(spool, ("b1@partner.test", PARTNER))
    for message in (a, b):
        for row in await rows(spool, message):
            await put(spool, row, DEFERRED)

    def due(found: list[RecipientRow]) -> list[bool]:
        return [r.next_attempt_at == NOW for r in found]

    assert await spool.change(Event.RETRY_NOW, now=NOW, message=b) == 1
    assert due(await rows(spool, a)) == [False, False]
    assert await spool.change(Event.RETRY_NOW, now=NOW, connector=PARTNER) == 2
    assert due(await rows(spool, a)) == [True, False]
    assert await spool.change(Event.RETRY_NOW, now=NOW + 1, connector="Nowhere") == 0
    # All of them; those already due count too (they were made due "now" as well).
    assert await spool.change(Event.RETRY_NOW, now=NOW) == 3
    assert due(await rows(spool, a)) == [True, True]


async def test_retry_by_domain_is_case_insensitive_and_literal(spool: Spool) -> None:
    """Fix now's retry: recipients at exactly these domains, whatever their case; `_` and
    `%` in a domain are characters, not LIKE's wildcards."""
    message = await queue(
        spool,
        "one@Ex_ample.TEST",
        "two@exXample.test",
        "three@sub.ex_ample.test",
        "four@ex_ample.test",
        "five@100%.test",
        "six@1000.test",
    )
    for row in await rows(spool, message):
        await put(spool, row, DEFERRED)
    changed = await spool.change(Event.RETRY_NOW, now=NOW, domains=["ex_ample.test", "100%.test"])
    assert changed == 3
    made_due = [r.address for r in await rows(spool, message) if r.next_attempt_at == NOW]
    assert made_due == ["one@Ex_ample.TEST", "four@ex_ample.test", "five@100%.test"]


async def test_delete_removes_the_message_and_its_recipients(spool: Spool) -> None:
    message = await one_in_each_state(spool)
    kept = await queue(spool, "kept@partner.test")
    assert await spool.change(Event.DELETE, now=NOW, message=message) == 1
    assert await spool.get_message(message) is None
    assert not await spool.message_exists(message)
    assert await spool.change(Event.DELETE, now=NOW, message=message) == 0
    assert [m.id for m in await spool.list_messages()] == [kept]
    assert await spool.bounces_due(limit=10) == []  # its failed recipients owe nothing now


async def test_change_refuses_what_is_not_an_administrators_event(spool: Spool) -> None:
    message = await queue(spool, "u@partner.test")
    with pytest.raises(ValueError, match="delete removes one message"):
        await spool.change(Event.DELETE, now=NOW)
    for event in (Event.DELIVERED, Event.TRANSIENT, Event.PERMANENT, Event.EXPIRY):
        with pytest.raises(ValueError, match="delivery result"):
            await spool.change(event, now=NOW, message=message)
    (row,) = await rows(spool, message)
    assert row.status is Status.QUEUED


async def test_nothing_final_is_changed_by_any_event(spool: Spool) -> None:
    message = await one_in_each_state(spool)
    final = [r for r in await rows(spool, message) if r.status in FINAL]
    for event in ADMIN_EVENTS:
        await spool.change(event, now=NOW, message=message)
    assert [r for r in await rows(spool, message) if r.status in FINAL] == final


# ---- runtime settings ---------------------------------------------------------------------


async def test_settings_come_back_as_the_values_written(spool: Spool) -> None:
    assert await spool.get_setting(CLOCK_OFFSET) is None
    await spool.set_setting(CLOCK_OFFSET, 86400.5)
    await spool.set_setting(DOMAIN_TYPE("onprem.contoso.test"), DomainType.AUTHORITATIVE)
    await spool.set_setting(CONNECTOR_ENABLED("To on-premises"), False)
    await spool.set_setting(ALERT_NOTIFIED("Partner"), T0 + 0.25)

    assert await spool.get_setting(CLOCK_OFFSET) == 86400.5
    assert await spool.get_setting(DOMAIN_TYPE("onprem.contoso.test")) is DomainType.AUTHORITATIVE
    assert await spool.get_setting(DOMAIN_TYPE("contoso.test")) is None
    assert await spool.get_setting(CONNECTOR_ENABLED("To on-premises")) is False
    assert await spool.get_setting(ALERT_NOTIFIED("Partner")) == T0 + 0.25

    notified = await spool.settings(ALERT_NOTIFIED)
    assert ALERT_NOTIFIED.names(notified) == {"Partner"}
    assert ALERT_NOTIFIED("Partner").read(notified) == T0 + 0.25
    everything = await spool.settings()
    assert DOMAIN_TYPE("onprem.contoso.test").read(everything) is DomainType.AUTHORITATIVE
    assert CONNECTOR_ENABLED("To on-premises").read(everything) is False
    assert len(everything) == 4

    await spool.set_setting(CONNECTOR_ENABLED("To on-premises"), None)
    await spool.set_setting(CLOCK_OFFSET, None)
    assert await spool.get_setting(CONNECTOR_ENABLED("To on-premises")) is None
    assert await spool.get_setting(CLOCK_OFFSET) is None
    assert len(await spool.settings()) == 2


async def test_a_commit_is_announced_to_the_listeners(spool: Spool) -> None:
    heard: list[int] = []
    spool.on_commit.append(lambda: heard.append(1))
    message = await queue(spool, "u@partner.test")
    await spool.change(Event.HOLD, now=NOW, message=message)
    await spool.set_setting(CLOCK_OFFSET, 1.0)
    assert len(heard) == 3
