"""Issue 10, "What must hold" 1: one bad message never hurts another.

- The writer: a write that fails inside a group commit fails alone; the other sessions'
  messages and the delivery results sharing its batch commit.
- The worker: an unexpected exception while delivering one message defers that message
  (4.3.0, its next retry interval) and the rest of the route goes on; a result that cannot
  be written is retried with backoff, never by sending the message again.

Real SQLite files, real SMTP peers on loopback; queue time moves on the relay's ManualClock.
The only real waits are the result-write backoff (real time: a disk comes back in real
time) and the short busy timeout of a database another connection holds locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from relay.agents import Parcel, Results, maildir
from relay.agents.smtp import SmtpAgent
from relay.errors import StoreError
from relay.qmgr import QueueManager
from relay.resolve import Resolver
from relay.routing import Route, RouteKind
from relay.server import Relay
from relay.spool import schema
from relay.spool.protocol import Spool
from relay.spool.rows import NewMessage, NewRecipient, Result
from relay.states import Change, Status
from tests.delivery_support import (
    ScriptedPeer,
    advance,
    connector,
    enqueue,
    example_connectors,
    manual_relay,
    recipient,
    run_once,
    store_of,
)
from tests.helpers import (
    HOST,
    command,
    make_message,
    poll,
    send_data,
    send_mail,
    smtp_client,
    write_config,
)

pytestmark = pytest.mark.timeout(60)

SCHEDULE = [60, 300, 900, 1800, 3600]  # the example config's retry_schedule
PARTNER = "Partner"
BAD_SENDER = "b\udcffd@fabrikam.test"  # invalid UTF-8 as aiosmtpd hands it on: a lone surrogate


def _message(queue_id: int, *, mail_from: str = "sender@fabrikam.test") -> NewMessage:
    return NewMessage(
        id=queue_id,
        message_id=f"<{queue_id}@test>",
        mail_from=mail_from,
        subject=f"message {queue_id}",
        received_at=1_800_000_000.0,
        expires_at=1_800_000_000.0 + 48 * 3600,
        client_address=HOST,
        client_helo="client.fabrikam.test",
        recipients=[NewRecipient(f"user{queue_id}@partner.test", PARTNER)],
        content=make_message(subject=f"message {queue_id}"),
    )


# ---- the writer (each spool backend: the `spool` fixture) -------------------------------------


async def test_one_unbindable_message_fails_alone_in_its_batch(spool: Spool) -> None:
    """31 sessions queue at once (one group commit); the one whose sender SQLite cannot
    bind gets StoreError (its 451), the 30 others are committed and readable."""
    ids = [spool.reserve_id() for _ in range(31)]
    bad = ids[15]
    messages = [_message(i, mail_from=BAD_SENDER if i == bad else "s@fabrikam.test") for i in ids]
    results = await asyncio.gather(*(spool.enqueue(m) for m in messages), return_exceptions=True)

    failed = [i for i, r in zip(ids, results, strict=True) if isinstance(r, BaseException)]
    assert failed == [bad], results
    assert isinstance(results[15], StoreError)
    assert "surrogates not allowed" in str(results[15])
    for queue_id in ids:
        found = await spool.get_message(queue_id)
        if queue_id == bad:
            assert found is None, "nothing partial of the failed message is stored"
            continue
        assert found is not None
        assert found.subject == f"message {queue_id}"
        assert [r.address for r in found.recipients] == [f"user{queue_id}@partner.test"]
        assert await spool.content(queue_id) == make_message(subject=f"message {queue_id}")
    # The writer is not left inside a transaction: the next write commits as usual.
    after = spool.reserve_id()
    assert await spool.enqueue(_message(after)) == after


async def test_delivery_results_sharing_a_failing_batch_are_written(spool: Spool) -> None:
    """Results (Spool.record) in the batch of a bad message are written: a lost result
    would have the message delivered again."""
    first = [spool.reserve_id() for _ in range(4)]
    await asyncio.gather(*(spool.enqueue(_message(i)) for i in first))
    rows = await spool.due(now=2_000_000_000.0, limit=10)
    assert len(rows) == 4
    at = 1_800_000_100.0
    done = Change(Status.DELIVERED, None, attempted=True)
    delivered = [Result(r.id, Status.QUEUED, done, at, PARTNER) for r in rows[:3]]
    later_on = Change(Status.DEFERRED, at + 60, attempted=True)
    deferred = Result(rows[3].id, Status.QUEUED, later_on, at, PARTNER)

    later = [spool.reserve_id() for _ in range(10)]
    bad = later[4]
    writes: list[Awaitable[Any]] = [
        spool.enqueue(_message(i, mail_from=BAD_SENDER if i == bad else "s@fabrikam.test"))
        for i in later
    ]
    writes.insert(2, spool.record(delivered[:2]))
    writes.insert(7, spool.record([delivered[2], deferred]))
    results = await asyncio.gather(*writes, return_exceptions=True)

    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], StoreError), results
    for row in rows[:3]:
        (found,) = (await spool.get_message(row.message)).recipients  # type: ignore[union-attr]
        assert found.status is Status.DELIVERED
        assert found.next_attempt_at is None
        assert found.attempts == 1
    (waiting,) = (await spool.get_message(rows[3].message)).recipients  # type: ignore[union-attr]
    assert waiting.status is Status.DEFERRED
    assert waiting.next_attempt_at == at + 60
    assert sorted(m.id for m in await spool.list_messages()) == sorted(
        [*first, *(i for i in later if i != bad)]
    )


async def test_an_unbindable_sender_over_smtp_costs_no_one_else_their_250(
    relay_server: Relay,
) -> None:
    """The issue's case over real sockets: one client with an invalid UTF-8 sender among
    normal ones, several rounds. Every normal message gets its 250; the bad one is refused
    (451 from the store today; intake may refuse it earlier, at MAIL, with 501/553)."""

    async def bad_client() -> str:
        async with smtp_client(relay_server.port) as client:
            reply = await command(client, b"MAIL FROM:<b\xffd@fabrikam.test>")
            if reply.code != 250:
                return f"{reply.code} {reply.message}"
            await client.rcpt("alice@contoso.test")
            final = await send_data(client, make_message(subject="bad"))
            return f"{final.code} {final.message}"

    for round_ in range(5):
        good = [
            send_mail(relay_server.port, content=make_message(subject=f"r{round_} n{n}"))
            for n in range(12)
        ]
        replies = await asyncio.gather(bad_client(), *good)
        assert not replies[0].startswith("250"), replies[0]
        refused = [r for r in replies[1:] if not r.startswith("250 ")]
        assert not refused, f"round {round_}: normal messages refused: {refused}"
    subjects = {m.subject for m in await store_of(relay_server).list_messages()}
    assert subjects == {f"r{r} n{n}" for r in range(5) for n in range(12)}


# ---- the worker: an exception while delivering one message ---------------------------------


class PoisonAgent(SmtpAgent):
    """The real agent, except that loading one message's content raises: an unexpected
    exception from inside `deliver`, in the middle of a chunk (as a ValueError from the
    SMTP client library would be)."""

    def __init__(self, *, poison: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poison = poison
        self.raised = 0

    def deliver(
        self,
        route: Route,
        parcels: Sequence[Parcel],
        content: Callable[[int], Awaitable[bytes]],
    ) -> AsyncIterator[tuple[Parcel, Results]]:
        async def poisoned(message: int) -> bytes:
            if message == self.poison:
                self.raised += 1
                raise ValueError(f"poisoned message {message}")
            return await content(message)

        return super().deliver(route, parcels, poisoned)


def use_agent(relay: Relay, agent: SmtpAgent) -> None:
    """Give the relay a queue manager of its own making around `agent` for SMTP routes
    (the public constructor; Relay.stop() stops whichever queue manager it holds)."""
    assert relay.worker is not None
    config = relay.config
    relay.worker = QueueManager(
        spool=store_of(relay),
        clock=relay.clock,
        policy=lambda: relay.policy,
        agents={**relay.worker.agents, RouteKind.CONNECTOR: agent, RouteKind.MX: agent},
        retry_schedule=config.queue.retry_schedule,
        message_expiration=config.queue.message_expiration,
        retention=config.queue.retention,
        hostname=config.smtp.hostname,
        postmaster=f"postmaster@{config.default_domain}",
    )


def partner_config(directory: Path, peer: ScriptedPeer) -> Path:
    return write_config(
        directory,
        connectors=[*example_connectors(), connector(PARTNER, "partner.test", peer.port)],
    )


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info and r.name.startswith("relay")]


def received_subjects(peer: ScriptedPeer) -> Counter[str]:
    found: Counter[str] = Counter()
    for delivered in peer.received:
        for line in delivered.data.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                found[line[9:].decode()] += 1
    return found


async def test_an_exception_delivering_one_message_defers_it_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The oldest message of a route raises inside the agent: it is deferred with 4.3.0
    until its next retry interval, the route's other messages are delivered in the same
    pass, one traceback is logged, and nothing is sent twice. After the interval it is tried
    again (and deferred again while it still raises); once it stops raising it goes."""
    caplog.set_level(logging.INFO)
    async with ScriptedPeer() as peer, manual_relay(partner_config(tmp_path, peer)) as relay:
        agent = PoisonAgent(
            poison=None,
            resolver=Resolver(nameservers=[], timeout=1.0),
            hostname=relay.config.smtp.hostname,
        )
        use_agent(relay, agent)
        poison = await enqueue(
            relay, to="first@partner.test", mail_from="s@fabrikam.test", subject="poison"
        )
        agent.poison = poison
        others = [
            await enqueue(
                relay, to=f"u{n}@partner.test", mail_from="s@fabrikam.test", subject=f"ok {n}"
            )
            for n in range(6)
        ]
        start = relay.clock.now()
        await run_once(relay)

        assert received_subjects(peer) == Counter({f"ok {n}": 1 for n in range(6)})
        for queue_id in others:
            assert (await recipient(relay, queue_id)).status is Status.DELIVERED
        row = await recipient(relay, poison)
        assert row.status is Status.DEFERRED
        assert row.attempts == 1
        assert row.next_attempt_at == start + SCHEDULE[0]
        assert row.last_error is not None
        assert row.last_error.code == "4.3.0"
        assert row.last_error.reply == (
            "451 4.3.0 Error: local error in processing "
            f"(reading the content failed: ValueError: poisoned message {poison})"
        )
        assert [a.reply for a in row.history] == [row.last_error.reply]
        assert agent.raised == 1
        assert len(tracebacks(caplog)) == 1, [r.getMessage() for r in tracebacks(caplog)]

        # Not due before its interval: nothing happens (no hot loop).
        advance(relay, SCHEDULE[0] - 1)
        await run_once(relay)
        assert agent.raised == 1

        advance(relay, 1)
        await run_once(relay)
        row = await recipient(relay, poison)
        assert agent.raised == 2
        assert row.status is Status.DEFERRED
        assert row.attempts == 2
        assert row.next_attempt_at == start + SCHEDULE[0] + SCHEDULE[1]
        assert len(tracebacks(caplog)) == 2

        agent.poison = None
        advance(relay, SCHEDULE[1])
        await run_once(relay)
        assert (await recipient(relay, poison)).status is Status.DELIVERED
        assert received_subjects(peer) == Counter({"poison": 1, **{f"ok {n}": 1 for n in range(6)}})


async def test_an_exception_writing_one_mailbox_message_defers_it_alone(
    relay_server: Relay, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Local delivery: a write that raises something other than OSError for one message
    defers that one (4.3.0); the next message to the same mailbox is delivered."""
    real = maildir.write_message

    def deliver(root: Path, address: str, *, mail_from: str, content: bytes) -> str:
        if b"Subject: poison" in content:
            raise RuntimeError("the Maildir library broke")
        return real(root, address, mail_from=mail_from, content=content)

    monkeypatch.setattr(maildir, "write_message", deliver)
    relay = relay_server
    poison = await enqueue(
        relay, to="alice@contoso.test", mail_from="s@fabrikam.test", subject="poison"
    )
    fine = await enqueue(
        relay, to="alice@contoso.test", mail_from="s@fabrikam.test", subject="fine"
    )
    start = relay.clock.now()
    await run_once(relay)

    assert (await recipient(relay, fine)).status is Status.DELIVERED
    row = await recipient(relay, poison)
    assert row.status is Status.DEFERRED
    assert row.next_attempt_at == start + SCHEDULE[0]
    assert row.last_error is not None and row.last_error.code == "4.3.0"
    assert "RuntimeError: the Maildir library broke" in row.last_error.reply
    assert len(tracebacks(caplog)) == 1


# ---- the worker: a result that cannot be written ----------------------------------------------


@contextlib.contextmanager
def write_locked(database: Path) -> Any:
    """Another connection holds the database's write lock (as a stuck CLI would): every
    write of the relay fails with "database is locked" after its busy timeout."""
    conn = sqlite3.connect(database, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        conn.rollback()
        conn.close()


async def test_a_result_that_cannot_be_written_is_retried_never_resent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While the results cannot be written the recipients stay in flight: the destination
    gets each message once (today: again every 20 ms). Once writes work again they are
    recorded and the rest of the route follows, each message once."""
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_MS", 50)
    async with ScriptedPeer() as peer, manual_relay(partner_config(tmp_path, peer)) as relay:
        ids = [
            await enqueue(
                relay, to=f"u{n}@partner.test", mail_from="s@fabrikam.test", subject=f"m{n}"
            )
            for n in range(5)
        ]
        with write_locked(store_of(relay).path):
            worker = asyncio.create_task(run_once(relay))
            await poll(lambda: bool(peer.received), what="the first message reached the peer")
            await asyncio.sleep(1.5)  # three write attempts (0.5 s, then 1 s backoff)
            assert received_subjects(peer) == Counter({"m0": 1}), "sent again, or went on sending"
            assert not worker.done()
            failures = [r for r in caplog.records if "could not write" in r.getMessage()]
            assert 2 <= len(failures) <= 4, [r.getMessage() for r in failures]
        await asyncio.wait_for(worker, 10)
        for queue_id in ids:
            assert (await recipient(relay, queue_id)).status is Status.DELIVERED
        assert received_subjects(peer) == Counter({f"m{n}": 1 for n in range(5)})
