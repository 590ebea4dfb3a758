"""The delivery agent's connection cache: reuse within the time limit, and a cached
connection that the server closed is replaced without reporting 4.4.318."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from relay.lab.faults import FaultLab
from relay.server import Relay
from relay.store import Status
from tests.delivery_support import (
    ScriptedPeer,
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
        agent = relay.worker._agent
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
