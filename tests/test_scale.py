"""Issue 6, section 3, the cheap version: a big deferred queue stays usable (no timing asserts).

bench/queue_scale.py measures the real thing (100,000 messages, wall times, idle CPU, RSS);
this keeps the correctness half in the suite so regressions show: 20,000 deferred messages
generated through the store, the CLI's first page and digest on them, the relay restarting
on that queue, and a connector that comes back getting a smaller set delivered exactly
once, within the per-route connection limit.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from relay.agents import CONNECTIONS_PER_ROUTE  # the queue manager's per-route limit
from relay.clock import ManualClock
from relay.spool.protocol import Spool
from relay.spool.rows import LastError, NewMessage, NewRecipient, Result
from relay.spool.sqlite import SqliteSpool, open_spool
from relay.states import Change, Event, Status
from tests.delivery_support import ClosedPort, Delivered, ScriptedPeer, connector, store_of
from tests.helpers import HOST, MakeConfig, StartRelay, run_cli_many, smtp_greets

BIG = 20_000
COMEBACK = 2_000
BATCH = 5_000
BIG_CONNECTOR = "Bench sink"
BIG_DOMAIN = "sink.bench.test"
COMEBACK_CONNECTOR = "Comes back"
COMEBACK_DOMAIN = "back.bench.test"
DAY = 86400.0
START = ManualClock().now()  # the in-process relay's clock: nothing generated is due there
BODY = b"x" * 400 + b"\r\n"


def _message(queue_id: int, n: int, domain: str, route: str, now: float) -> NewMessage:
    address = f"u{n}@{domain}"
    content = (
        f"From: bench@source.bench.test\r\nTo: {address}\r\nSubject: scale {n}\r\n"
        f"Message-ID: <scale-{n}@source.bench.test>\r\n\r\n"
    ).encode() + BODY
    return NewMessage(
        id=queue_id,
        message_id=f"<scale-{n}@source.bench.test>",
        mail_from="bench@source.bench.test",
        subject=f"scale {n}",
        received_at=now,
        expires_at=now + 30 * DAY,
        client_address=HOST,
        client_helo="source.bench.test",
        recipients=[NewRecipient(address, route)],
        content=content,
    )


async def _enqueue_many(store: Spool, count: int, domain: str, route: str, now: float) -> None:
    """Concurrent enqueues in batches: the store commits each batch as one transaction."""
    for first in range(0, count, BATCH):
        batch = range(first, min(count, first + BATCH))
        await asyncio.gather(
            *(store.enqueue(_message(store.reserve_id(), n, domain, route, now)) for n in batch)
        )


async def _generate_deferred(db: Path, count: int) -> None:
    """`count` messages for BIG_CONNECTOR, deferred with 4.4.316 until 20 days from START."""
    store = await open_spool(db)
    try:
        await _enqueue_many(store, count, BIG_DOMAIN, BIG_CONNECTOR, START)
        ids = [r[0] for r in await store.query("SELECT id FROM recipients ORDER BY id")]
        error = LastError(
            "4.4.316",
            "450 4.4.316 Connection refused",
            "Connection refused",
            HOST,
            HOST,
            START,
        )
        await store.record(
            [
                Result(
                    rid,
                    Status.QUEUED,
                    Change(Status.DEFERRED, START + 20 * DAY, attempted=True),
                    START,
                    BIG_CONNECTOR,
                    error,
                )
                for rid in ids
            ]
        )
    finally:
        await store.close()


_SESSION: contextvars.ContextVar[int] = contextvars.ContextVar("session", default=-1)


class _TaggedList(list[Delivered]):
    """ScriptedPeer's `received`, also noting which session each message came over."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions: list[int] = []

    def append(self, item: Delivered) -> None:
        self.sessions.append(_SESSION.get())
        super().append(item)


@dataclass
class CountingPeer(ScriptedPeer):
    """ScriptedPeer that also keeps the most sessions it had open at once."""

    received: list[Delivered] = field(default_factory=_TaggedList)
    started: int = 0
    open_sessions: int = 0
    max_open: int = 0

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.started += 1
        self.open_sessions += 1
        self.max_open = max(self.max_open, self.open_sessions)
        _SESSION.set(self.started)  # each session runs in its own task (its own context)
        try:
            await super()._session(reader, writer)
        finally:
            self.open_sessions -= 1


async def _status_counts(store: SqliteSpool, route: str) -> dict[str, int]:
    rows = await store.query(
        "SELECT status, count(*) FROM recipients WHERE connector = ? GROUP BY status", (route,)
    )
    return {str(status): int(count) for status, count in rows}


async def test_big_deferred_queue_lists_restarts_and_a_connector_comes_back(
    make_config: MakeConfig, start_relay: StartRelay, tmp_path: Path
) -> None:
    big_port, back_port = ClosedPort(), ClosedPort()
    try:
        config = make_config(
            connectors=[
                connector(BIG_CONNECTOR, BIG_DOMAIN, big_port.port),
                connector(COMEBACK_CONNECTOR, COMEBACK_DOMAIN, back_port.port),
            ]
        )
        db = tmp_path / "queue" / "relay.db"
        started = time.monotonic()
        await _generate_deferred(db, BIG)
        generated_in = time.monotonic() - started

        # The CLI on the big queue: the first page (newest last) and one digest row.
        listing, digest = await asyncio.to_thread(
            run_cli_many,
            ("queue", "list", "--status", "deferred", "--limit", "50", "--json"),
            ("queue", "digest", "--json"),
            config=config,
        )
        assert listing.code == 0, listing.stderr
        page = json.loads(listing.stdout)
        assert len(page) == 50
        assert [m["id"] for m in page] == list(range(BIG - 49, BIG + 1))
        assert all(r["status"] == "deferred" for m in page for r in m["recipients"])
        assert digest.code == 0, digest.stderr
        rows = json.loads(digest.stdout)
        assert len(rows) == 1, rows
        assert rows[0]["connector"] == BIG_CONNECTOR
        assert rows[0]["code"] == "4.4.316"
        assert rows[0]["messages"] == BIG
        assert rows[0]["recipients"] == BIG

        # The relay restarts on that queue: it greets, and nothing is due, so a pass of the
        # worker touches none of the 20,000 (they are not loaded, tried or expired).
        relay = await start_relay(config_path=config)
        store = store_of(relay)
        assert await asyncio.to_thread(smtp_greets, HOST, relay.port)
        assert await store.next_due_after(relay.clock.now()) == START + 20 * DAY
        assert relay.worker is not None
        await asyncio.wait_for(relay.worker.run_once(), 30)
        assert await _status_counts(store, BIG_CONNECTOR) == {"deferred": BIG}

        # A smaller set for a connector whose smart host is down: tried and deferred.
        await _enqueue_many(store, COMEBACK, COMEBACK_DOMAIN, COMEBACK_CONNECTOR, relay.clock.now())
        await asyncio.wait_for(relay.worker.run_once(), 60)
        assert await _status_counts(store, COMEBACK_CONNECTOR) == {"deferred": COMEBACK}
        (code,) = await store.query(
            "SELECT DISTINCT json_extract(last_error, '$.code') FROM recipients "
            "WHERE connector = ?",
            (COMEBACK_CONNECTOR,),
        )
        assert code == ("4.4.316",)

        # It comes back: a good server on that very port, and `relay queue retry --connector`
        # (the same store call, on the relay's clock) makes its mail due.
        back_port.release()
        peer = CountingPeer(port=back_port.port)
        async with peer:
            made_due = await store.change(
                Event.RETRY_NOW, now=relay.clock.now(), connector=COMEBACK_CONNECTOR
            )
            assert made_due == COMEBACK
            await asyncio.wait_for(relay.worker.run_once(), 120)
            await relay.worker.stop()  # QUIT the cached connections before counting

        delivered = Counter(rcpt for d in peer.received for rcpt in d.rcpt_tos)
        expected = {f"u{n}@{COMEBACK_DOMAIN}" for n in range(COMEBACK)}
        assert set(delivered) == expected
        assert max(delivered.values()) == 1, "a message was delivered twice"
        assert 1 <= peer.max_open <= CONNECTIONS_PER_ROUTE, f"{peer.max_open} sessions at once"
        assert await _status_counts(store, COMEBACK_CONNECTOR) == {"delivered": COMEBACK}
        assert await _status_counts(store, BIG_CONNECTOR) == {"deferred": BIG}
        assert await store.due(now=relay.clock.now(), limit=1) == []
        # Within one session the relay keeps queue order (u<n> numbers grow); across its
        # parallel sessions, dealt messages in turn, the order is close but not exact.
        for session_order in _per_session(peer):
            assert session_order == sorted(session_order)
        assert generated_in < 120  # a sanity bound for the generator, not a benchmark
    finally:
        big_port.release()
        back_port.release()


def _per_session(peer: CountingPeer) -> list[list[int]]:
    """The u<n> numbers each session delivered, in the order it delivered them."""
    received = peer.received
    assert isinstance(received, _TaggedList)
    sessions: dict[int, list[int]] = {}
    for session, delivered in zip(received.sessions, received, strict=True):
        for address in delivered.rcpt_tos:
            sessions.setdefault(session, []).append(int(address.split("@")[0][1:]))
    assert -1 not in sessions
    return list(sessions.values())
