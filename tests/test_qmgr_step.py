"""The queue manager's public step (SAQ/arq's process_one): `step()` starts the deliveries
for what is due now and returns at once, `settle()` waits for them; `run()` and
`run_once()` are built on them. Real SQLite, a real SMTP peer on loopback, a ManualClock."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.qmgr import QueueManager, scheduler
from relay.routing import RouteKind
from relay.server import Relay
from relay.states import Status
from tests.delivery_support import (
    ScriptedPeer,
    advance,
    connector,
    enqueue,
    example_connectors,
    manual_relay,
    recipient,
    store_of,
)
from tests.helpers import write_config

pytestmark = pytest.mark.timeout(30)

PARTNER = "Partner"


@contextlib.asynccontextmanager
async def partner_relay(tmp_path: Path) -> AsyncIterator[tuple[Relay, QueueManager, ScriptedPeer]]:
    async with ScriptedPeer() as peer:
        config = write_config(
            tmp_path,
            connectors=[*example_connectors(), connector(PARTNER, "partner.test", peer.port)],
        )
        async with manual_relay(config) as relay:
            assert relay.worker is not None
            yield relay, relay.worker, peer


async def queue(relay: Relay, count: int) -> list[int]:
    return [
        await enqueue(relay, to=f"u{n}@partner.test", mail_from="s@fabrikam.test", subject=f"m{n}")
        for n in range(count)
    ]


def subjects(peer: ScriptedPeer) -> Counter[str]:
    found: Counter[str] = Counter()
    for delivered in peer.received:
        for line in delivered.data.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                found[line[9:].decode()] += 1
    return found


async def test_nothing_due_starts_nothing(tmp_path: Path) -> None:
    async with partner_relay(tmp_path) as (_, qmgr, peer):
        assert await qmgr.step() is False
        assert qmgr.in_flight == 0
        await qmgr.settle()
        assert peer.connections == 0


async def test_a_step_starts_what_is_due_and_settle_waits_for_it(tmp_path: Path) -> None:
    async with partner_relay(tmp_path) as (relay, qmgr, peer):
        ids = await queue(relay, 3)

        assert await qmgr.step() is False  # fewer than a batch: nothing more due now
        assert qmgr.in_flight == 3  # started, not waited for
        # A second step while they are under way hands out nothing again.
        assert await qmgr.step() is False
        assert qmgr.in_flight <= 3
        await qmgr.settle()

        assert qmgr.in_flight == 0
        for queue_id in ids:
            assert (await recipient(relay, queue_id)).status is Status.DELIVERED
        assert subjects(peer) == Counter({"m0": 1, "m1": 1, "m2": 1})


async def test_a_full_batch_says_more_may_be_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler, "BATCH", 2)
    async with partner_relay(tmp_path) as (relay, qmgr, peer):
        ids = await queue(relay, 3)

        assert await qmgr.step() is True
        assert qmgr.in_flight == 2
        await qmgr.settle()
        assert [(await recipient(relay, i)).status for i in ids] == [
            Status.DELIVERED,
            Status.DELIVERED,
            Status.QUEUED,
        ]
        assert await qmgr.step() is False
        await qmgr.settle()
        assert (await recipient(relay, ids[2])).status is Status.DELIVERED
        assert subjects(peer) == Counter({"m0": 1, "m1": 1, "m2": 1})


async def test_a_step_gives_up_on_what_expired_without_trying_it(tmp_path: Path) -> None:
    async with partner_relay(tmp_path) as (relay, qmgr, peer):
        (queue_id,) = await queue(relay, 1)
        advance(relay, relay.config.queue.message_expiration)

        await qmgr.step()
        await qmgr.settle()

        row = await recipient(relay, queue_id)
        assert row.status is Status.EXPIRED
        assert row.last_error is not None
        assert row.last_error.reply == "550 4.4.7 QUEUE.Expired; message expired"
        assert row.last_error.title == "Message expired"
        assert peer.connections == 0


async def test_no_step_after_stop(tmp_path: Path) -> None:
    async with partner_relay(tmp_path) as (relay, qmgr, peer):
        (queue_id,) = await queue(relay, 1)
        await qmgr.stop(grace=1.0)

        assert await qmgr.step() is False
        assert qmgr.in_flight == 0
        assert (await recipient(relay, queue_id)).status is Status.QUEUED
        assert peer.connections == 0


async def test_every_route_kind_needs_an_agent(tmp_path: Path) -> None:
    async with partner_relay(tmp_path) as (relay, qmgr, _):
        config = relay.config
        with pytest.raises(ValueError, match="no delivery agent for route kind"):
            QueueManager(
                spool=store_of(relay),
                clock=relay.clock,
                policy=lambda: relay.policy,
                agents={RouteKind.MAILBOX: qmgr.agents[RouteKind.MAILBOX]},
                retry_schedule=config.queue.retry_schedule,
                message_expiration=config.queue.message_expiration,
                retention=config.queue.retention,
                hostname=config.smtp.hostname,
                postmaster=f"postmaster@{config.default_domain}",
            )
