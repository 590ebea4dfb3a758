"""Issue 10, "What must hold" 3: a stop under load starts no new transaction, lets the ones
under way finish and be recorded, and nothing is delivered twice.

The destination is the lab's ESMTP peer (aiosmtpd) made slow: it keeps each message as soon
as the content is in, then takes `delay` seconds to say 250, like a server that queues and
fsyncs before answering. A relay that cuts such a transaction leaves the message at the
destination but not recorded, and sends it again after the restart: that is the duplicate
the tests look for. Delivery tasks here take longer than the grace, as a real backlog does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.lab.faults import EsmtpServer, Fault, _Handler
from relay.qmgr import scheduler
from relay.spool import schema
from relay.spool.sqlite import open_spool
from relay.states import Status
from tests.delivery_support import (
    connector,
    enqueue,
    example_connectors,
    manual_relay,
    run_once,
    store_of,
)
from tests.helpers import (
    HOST,
    RelayProcess,
    free_port,
    make_message,
    poll,
    run_cli,
    send_mail,
    start_relay_process,
    write_config,
)

pytestmark = pytest.mark.timeout(90)

PARTNER = "Partner"
DELAY = 0.6  # seconds the destination takes to answer the end of the content
MESSAGES = 60


class _SlowHandler(_Handler):
    def __init__(self, sink: SlowSink) -> None:
        super().__init__(sink.received, rcpt_reply=None)
        self._sink = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)  # kept from here on
        self._sink.in_data += 1
        self._sink.most_in_data = max(self._sink.most_in_data, self._sink.in_data)
        try:
            await asyncio.sleep(self._sink.delay)
        finally:
            self._sink.in_data -= 1
        return reply


class SlowSink(EsmtpServer):
    """The lab's good ESMTP peer (no TLS), `delay` seconds slow to answer each message."""

    def __init__(self, delay: float = DELAY) -> None:
        super().__init__(Fault.GOOD, host=HOST, port=0, tls_context=None)
        self.delay = delay
        self.in_data = 0  # transactions between the end of their content and the 250
        self.most_in_data = 0
        self._handler = _SlowHandler(self)

    async def __aenter__(self) -> SlowSink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def subjects(self) -> Counter[str]:
        found: Counter[str] = Counter()
        for message in self.received:
            for line in message.data.split(b"\r\n"):
                if line.startswith(b"Subject: "):
                    found[line[9:].decode()] += 1
        return found


def partner_config(directory: Path, sink: SlowSink, **overrides: Any) -> Path:
    return write_config(
        directory,
        connectors=[*example_connectors(), connector(PARTNER, "partner.test", sink.port)],
        **overrides,
    )


def assert_recorded_as_received(statuses: dict[str, Status], sink: SlowSink) -> None:
    """Whatever the destination has is delivered in the queue; the rest is still pending,
    never tried (nothing was cut mid-transaction and left for a retry)."""
    received = set(sink.subjects())
    wrong = {s: v for s, v in statuses.items() if (v is Status.DELIVERED) != (s in received)}
    assert not wrong, f"queue and destination disagree: {wrong}"
    assert {v for s, v in statuses.items() if s not in received} <= {Status.QUEUED}


async def queue_statuses(path: Path) -> dict[str, Status]:
    """Subject → status of each (one-recipient) message, read from the database file."""
    opened = await open_spool(path, create=False)
    try:
        return {m.subject: m.recipients[0].status for m in await opened.list_messages()}
    finally:
        await opened.close()


async def test_stop_under_load_finishes_transactions_under_way_and_starts_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Six connections with ten messages each: every delivery task outlasts the grace.
    monkeypatch.setattr(scheduler, "PARCELS_PER_CONNECTION", 10)
    async with SlowSink() as sink:
        config = partner_config(tmp_path, sink)
        async with manual_relay(config) as relay:  # its stop at the end does nothing more
            for n in range(MESSAGES):
                await enqueue(
                    relay, to=f"u{n}@partner.test", mail_from="s@fabrikam.test", subject=f"m{n}"
                )
            assert relay.worker is not None
            loop = asyncio.create_task(relay.worker.run())
            await poll(
                lambda: len(sink.received) > 6 and sink.in_data >= 3,
                what="a second round of transactions in DATA",
                timeout=15.0,
                step=0.02,
            )
            started = time.monotonic()
            await relay.stop()
            took = time.monotonic() - started
            await asyncio.wait_for(loop, 1)
        assert sink.most_in_data >= 6, "the deliveries did not run side by side"
        assert took < 2.0, f"stop took {took:.2f}s for transactions of {DELAY}s (grace 5s)"
        received = sink.subjects()
        assert 6 < len(received) < MESSAGES / 2
        assert_recorded_as_received(await queue_statuses(relay.db_path), sink)

        sink.delay = 0
        async with manual_relay(config) as again:
            await run_once(again)
            assert set((await queue_statuses(again.db_path)).values()) == {Status.DELIVERED}
        assert sink.subjects() == Counter({f"m{n}": 1 for n in range(MESSAGES)})


# ---- relay serve and SIGTERM ------------------------------------------------------------------


def serve_config(directory: Path, sink: SlowSink) -> Path:
    """A config on a fixed free port (a subprocess must know it before it starts)."""
    return partner_config(directory, sink, smtp={"listen": f"{HOST}:{free_port()}"})


async def queue_list(config: Path) -> dict[str, str]:
    """Subject → status through `relay queue list --json` (the server may be down)."""
    result = await asyncio.to_thread(run_cli, "queue", "list", "--all", "--json", config=config)
    assert result.code == 0, result.stderr
    return {m["subject"]: m["recipients"][0]["status"] for m in json.loads(result.stdout)}


async def submit_all(process: RelayProcess, count: int) -> None:
    """Six messages at a time, a tenth of a second apart: mail arriving as it does, each
    group dispatched on its own, so the route's ten connections all get busy."""

    async def one(n: int) -> None:
        reply = await send_mail(
            process.port,
            rcpt_tos=[f"u{n}@partner.test"],
            content=make_message(subject=f"m{n}", to=f"u{n}@partner.test"),
        )
        assert reply.startswith("250 "), reply

    for first in range(0, count, 6):
        await asyncio.gather(*(one(n) for n in range(first, min(first + 6, count))))
        await asyncio.sleep(0.1)


async def test_sigterm_under_load_exits_0_soon_and_nothing_arrives_twice(tmp_path: Path) -> None:
    """`relay serve` with 60 messages for one connector, ten connections busy, each
    transaction 1 s slow (every connection has more left than the grace): SIGTERM ends it with 0 well inside the 5 s grace; what the
    destination got is delivered in the queue, the rest queued; after a restart everything
    arrives, nothing twice."""
    async with SlowSink(delay=1.0) as sink:
        process = await asyncio.to_thread(start_relay_process, serve_config(tmp_path, sink))
        try:
            await submit_all(process, MESSAGES)
            await poll(
                lambda: bool(sink.received) and sink.in_data >= 5,
                what="several transactions in DATA",
                timeout=15.0,
                step=0.02,
            )
            in_data = sink.in_data
            started = time.monotonic()
            process.signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.process.wait, 15)
            took = time.monotonic() - started
        finally:
            if process.process.poll() is None:
                process.kill()
        output = process.output()
        print(f"\nSIGTERM to exit: {took:.2f}s with {in_data} transactions in DATA")
        assert code == 0, output
        assert "Traceback" not in output
        assert took < 3.0, f"SIGTERM to exit took {took:.2f}s (grace 5s)\n{output}"
        statuses = await queue_list(process.config)
        assert len(statuses) == MESSAGES
        received = set(sink.subjects())
        assert received, "nothing was delivered before the stop"
        assert {statuses[s] for s in received} == {"delivered"}
        assert {v for s, v in statuses.items() if s not in received} <= {"queued"}

        sink.delay = 0
        config = serve_config(tmp_path, sink)  # the same queue, a fresh port
        process = await asyncio.to_thread(start_relay_process, config)
        try:

            async def all_delivered() -> bool:
                return set((await queue_list(config)).values()) == {"delivered"}

            await poll(
                all_delivered, what="everything delivered after the restart", timeout=30, step=0.3
            )
            process.signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.process.wait, 15) == 0
        finally:
            if process.process.poll() is None:
                process.kill()
    assert sink.subjects() == Counter({f"m{n}": 1 for n in range(MESSAGES)})


# ---- results that cannot be written when the stop comes ---------------------------------------


def write_lock(database: Path) -> sqlite3.Connection:
    """Another connection takes the write lock: the relay's writes fail ("database is
    locked") after its busy timeout, as they would on a full disk."""
    conn = sqlite3.connect(database, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def release(conn: sqlite3.Connection) -> None:
    conn.rollback()
    conn.close()


async def test_stop_writes_results_that_failed_once_writes_work_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A result that could not be written is written during the grace once the database
    takes writes again; the stop then returns, and nothing is sent after the restart."""
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_MS", 50)
    caplog.set_level(logging.INFO, logger="relay.worker")
    async with SlowSink(delay=0) as sink:
        config = partner_config(tmp_path, sink)
        async with manual_relay(config) as relay:
            await enqueue(relay, to="u@partner.test", mail_from="s@fabrikam.test", subject="m")
            lock = write_lock(store_of(relay).path)
            try:
                assert relay.worker is not None
                loop = asyncio.create_task(relay.worker.run_once())
                await poll(
                    lambda: bool(sink.received),
                    what="the message at the destination",
                    timeout=15.0,
                    step=0.02,
                )
                await poll(
                    lambda: "could not write" in caplog.text,
                    what="a failed write",
                    timeout=15.0,
                    step=0.02,
                )
                stopping = asyncio.create_task(relay.stop(grace=4.0))
                await asyncio.sleep(1.0)
                assert not stopping.done(), "the stop did not wait for the unwritten result"
            finally:
                release(lock)
            started = time.monotonic()
            await asyncio.wait_for(stopping, 4.0)
            assert time.monotonic() - started < 1.0  # retried every 0.5 s within the grace
            await asyncio.wait_for(loop, 1)
        assert "wrote the results of id=1 after all" in caplog.text
        assert await queue_statuses(relay.db_path) == {"m": Status.DELIVERED}
        async with manual_relay(config) as again:
            await run_once(again)
    assert sink.subjects() == Counter({"m": 1})


async def test_stop_says_so_when_results_cannot_be_written_within_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Still unwritable when the grace ends: the stop returns at the grace and the log
    says the message will be delivered again after the restart (and it is)."""
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_MS", 50)
    async with SlowSink(delay=0) as sink:
        config = partner_config(tmp_path, sink)
        async with manual_relay(config) as relay:
            await enqueue(relay, to="u@partner.test", mail_from="s@fabrikam.test", subject="m")
            lock = write_lock(store_of(relay).path)
            try:
                assert relay.worker is not None
                loop = asyncio.create_task(relay.worker.run_once())
                await poll(
                    lambda: "could not write" in caplog.text,
                    what="a failed write",
                    timeout=15.0,
                    step=0.02,
                )
                started = time.monotonic()
                await relay.stop(grace=1.5)
                took = time.monotonic() - started
            finally:
                release(lock)
            await asyncio.wait_for(loop, 1)
        assert 1.4 < took < 3.5, took
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("id=1" in line and "after the restart" in line for line in lines), lines
        assert await queue_statuses(relay.db_path) == {"m": Status.QUEUED}
        async with manual_relay(config) as again:
            await run_once(again)
    assert sink.subjects() == Counter({"m": 2})  # the duplicate the log line announced
