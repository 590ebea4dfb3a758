"""The delivery agent's connection cache: reuse within the time limit, a cached connection
that the server closed is replaced without reporting 4.4.318, and a delivery stopped part
way (the worker shutting down) leaves no session half-used or cached mid-transaction."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from relay.agents import DeliveryAgent, Parcel
from relay.lab.faults import FaultLab
from relay.routing import RouteKind, route
from relay.server import Relay
from relay.states import Status
from tests.delivery_support import (
    SENDER,
    ScriptedPeer,
    accepted,
    connector,
    lab_config,
    manual_relay,
    recipient,
    run_once,
    submit,
)


@contextlib.asynccontextmanager
async def peer_relay(tmp_path: Path, lab: FaultLab, peer: ScriptedPeer) -> AsyncIterator[Relay]:
    partner = connector("Partner", "partner.test", peer.port, tls="none")
    async with manual_relay(lab_config(tmp_path / "peer", lab, connectors=[partner])) as relay:
        yield relay


async def test_a_second_pass_reuses_the_cached_connection(tmp_path: Path, lab: FaultLab) -> None:
    async with ScriptedPeer() as peer, peer_relay(tmp_path, lab, peer) as relay:
        first = await submit(relay, to="a@partner.test", subject="first")
        await run_once(relay)
        second = await submit(relay, to="b@partner.test", subject="second")
        await run_once(relay)

        for queue_id in (first, second):
            assert (await recipient(relay, queue_id)).status is Status.DELIVERED
        assert peer.connections == 1
        assert peer.commands[0].count("MAIL") == 2
        assert "QUIT" not in peer.commands[0]  # still cached, not closed


async def test_idle_connections_are_closed_after_the_time_limit(
    tmp_path: Path, lab: FaultLab
) -> None:
    async with ScriptedPeer() as peer, peer_relay(tmp_path, lab, peer) as relay:
        await submit(relay, to="a@partner.test")
        await run_once(relay)
        assert relay.worker is not None
        agent = relay.worker.agents[RouteKind.CONNECTOR]
        assert agent.has_idle

        await agent.close_idle(older_than=0)

        assert not agent.has_idle
        assert peer.commands[0][-1] == "QUIT"


async def test_a_cached_connection_the_server_dropped_is_replaced(
    tmp_path: Path, lab: FaultLab
) -> None:
    async with ScriptedPeer() as peer, peer_relay(tmp_path, lab, peer) as relay:
        first = await submit(relay, to="a@partner.test", subject="first")
        await run_once(relay)
        # The server goes away and comes back on the same port: the cached connection is dead.
        port = peer.port
        await peer.stop()
        async with ScriptedPeer(port=port) as again:
            second = await submit(relay, to="b@partner.test", subject="second")
            await run_once(relay)

            assert (await recipient(relay, first)).status is Status.DELIVERED
            row = await recipient(relay, second)
            assert row.status is Status.DELIVERED, row.last_error
            assert row.last_error is None
            assert again.connections == 1


def _agent(relay: Relay) -> DeliveryAgent:
    assert relay.worker is not None
    return relay.worker.agents[RouteKind.CONNECTOR]


async def _content(message: int) -> bytes:
    return f"Subject: message {message}\r\n\r\nhello\r\n".encode()


async def test_a_delivery_closed_at_a_yield_quits_and_sends_nothing_more(
    tmp_path: Path, lab: FaultLab
) -> None:
    """The worker stopping: it takes the first parcel's results, then closes the generator
    (contextlib.aclosing). The session is between transactions there: QUIT, not cached."""
    async with ScriptedPeer() as peer, peer_relay(tmp_path, lab, peer) as relay:
        agent = _agent(relay)
        the_route = route("a@partner.test", relay.policy)
        parcels = [Parcel(n, SENDER, ((n, f"r{n}@partner.test"),)) for n in (1, 2, 3)]
        taken = []
        async with contextlib.aclosing(agent.deliver(the_route, parcels, _content)) as stream:
            async for parcel, results in stream:
                taken.append((parcel.message, accepted(results)))
                break

        assert taken == [(1, {1: None})]
        assert [d.rcpt_tos for d in peer.received] == [("r1@partner.test",)]
        assert peer.commands == [["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]]
        assert not agent.has_idle


async def test_a_transaction_cancelled_inside_data_is_closed_at_once_never_quit_or_cached(
    tmp_path: Path, lab: FaultLab
) -> None:
    """Cancelled while the server has not yet answered the content: a QUIT would only
    queue behind the unanswered DATA (costing its whole timeout), and caching the session
    would pair the late 250 with the next command. It is closed, now."""
    async with ScriptedPeer(silent_at=".") as peer, peer_relay(tmp_path, lab, peer) as relay:
        agent = _agent(relay)
        the_route = route("a@partner.test", relay.policy)
        parcels = [Parcel(1, SENDER, ((1, "a@partner.test"),))]

        async def consume() -> None:
            async with contextlib.aclosing(agent.deliver(the_route, parcels, _content)) as s:
                async for _ in s:
                    pass

        task = asyncio.create_task(consume())
        for _ in range(500):  # a real network wait, 5 s at most: the content reaching the peer
            if peer.commands and peer.commands[0][-1:] == ["."]:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"the peer never got the whole content: {peer.commands}")
        started = time.monotonic()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

        assert time.monotonic() - started < 1.0
        assert not agent.has_idle
        assert peer.received == []
