"""Poison messages (issue 10): one parcel never stops the others on its route.

An address SMTP cannot carry (a CR in a quoted local part, which an internal relay domain
used to accept) fails permanently before anything is written for it; any other exception
in one parcel's transaction fails that parcel alone, and the next parcel goes over a fresh
connection. Messages are queued straight into the store (the intake is being taught to
refuse such addresses), delivered to a ScriptedPeer on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from relay.agents import Parcel, Results
from relay.agents.smtp import MAX_PATH, SmtpAgent, unsendable
from relay.classify import Failure, Stage, classify
from relay.config import Connector
from relay.lab.faults import FaultLab
from relay.resolve import Resolver
from relay.routing import Route, RouteKind
from relay.server import Relay
from relay.states import Status
from tests.delivery_support import (
    SENDER,
    ScriptedPeer,
    accepted,
    advance,
    closed_port,
    connector,
    enqueue,
    lab_config,
    maildir_messages,
    manual_relay,
    recipient,
    run_once,
)

pytestmark = pytest.mark.timeout(60)

POISON = '"bad\rname"@partner.test'  # a CR inside a quoted local part
OTHERS = 10
SCHEDULE = [60, 300, 900, 1800, 3600]  # the example config's retry_schedule


# ---- helpers --------------------------------------------------------------------------------


def partner_route(port: int) -> Route:
    """The route of partner.test: connector "Partner", smart host 127.0.0.1:port, no TLS."""
    partner = Connector.model_validate(connector("Partner", "partner.test", port))
    return Route(RouteKind.CONNECTOR, "partner.test", partner)


def new_agent() -> SmtpAgent:
    return SmtpAgent(resolver=Resolver(nameservers=[], timeout=1.0), hostname="relay.contoso.test")


def loader(
    content: bytes = b"Subject: t\r\n\r\nhello\r\n",
) -> Callable[[int], Awaitable[bytes]]:
    async def load(message: int) -> bytes:
        return content

    return load


async def deliver_all(
    agent: SmtpAgent,
    the_route: Route,
    parcels: Sequence[Parcel],
    content: Callable[[int], Awaitable[bytes]] | None = None,
) -> dict[int, Results]:
    """Every parcel's results, by message id."""
    got: dict[int, Results] = {}
    async for parcel, results in agent.deliver(the_route, parcels, content or loader()):
        got[parcel.message] = accepted(results)
    return got


@contextlib.asynccontextmanager
async def peer_relay(tmp_path: Path, lab: FaultLab, peer: ScriptedPeer) -> AsyncIterator[Relay]:
    partner = connector("Partner", "partner.test", peer.port)
    async with manual_relay(lab_config(tmp_path / "peer", lab, connectors=[partner])) as relay:
        yield relay


async def queue(relay: Relay, to: list[str], *, subject: str) -> int:
    """Queue one message for `to` straight into the store, bypassing the intake."""
    return await enqueue(relay, to=to, mail_from=SENDER, subject=subject)


async def run_until_idle(relay: Relay) -> None:
    """run_once, bounded: a worker that re-sends the same message forever never returns."""
    try:
        async with asyncio.timeout(10):
            await run_once(relay)
    except TimeoutError:
        pytest.fail("run_once did not finish in 10 s: the worker is sending the same mail again")


# ---- through the worker ---------------------------------------------------------------------


async def test_a_recipient_holding_a_cr_fails_alone_and_the_connectors_mail_still_goes(
    tmp_path: Path, lab: FaultLab
) -> None:
    """The issue's case: the poison message is the oldest for its connector, 10 others wait.
    All 10 and the poison message's good recipient are delivered; the poison recipient fails
    for good with 5.1.3 and an NDR, after exactly one attempt and nothing on the wire."""
    async with ScriptedPeer() as peer, peer_relay(tmp_path, lab, peer) as relay:
        poison = await queue(relay, [POISON, "first@partner.test"], subject="poison")
        others = [
            await queue(relay, [f"r{n}@partner.test"], subject=f"m{n}") for n in range(OTHERS)
        ]
        await run_until_idle(relay)

        for queue_id in others:
            assert (await recipient(relay, queue_id)).status is Status.DELIVERED
        assert (await recipient(relay, poison, "first@partner.test")).status is Status.DELIVERED
        bad = await recipient(relay, poison, POISON)
        assert bad.status is Status.FAILED
        assert bad.attempts == 1
        assert bad.last_error is not None
        assert bad.last_error.code == "5.1.3"
        assert bad.last_error.reply.startswith("550 5.1.3 Recipient address ")
        assert "control character (CR)" in bad.last_error.reply
        assert "\r" not in bad.last_error.reply  # shown escaped, never raw
        # An NDR for it reached the sender's mailbox.
        (ndr,) = maildir_messages(relay, SENDER)
        assert "Status: 5.1.3" in ndr.as_string()
        # Nothing for it reached the wire, and nothing was sent twice.
        delivered = [rcpt for d in peer.received for rcpt in d.rcpt_tos]
        assert sorted(delivered) == sorted(
            ["first@partner.test", *(f"r{n}@partner.test" for n in range(OTHERS))]
        )
        assert peer.sent_commands().count("MAIL") == OTHERS + 1
        assert peer.sent_commands().count("RCPT") == OTHERS + 1

        # Failed is final: later passes send nothing more.
        advance(relay, SCHEDULE[-1] + 1)
        await run_until_idle(relay)
        assert peer.sent_commands().count("MAIL") == OTHERS + 1


async def test_an_unexpected_exception_defers_its_recipient_to_the_next_interval(
    tmp_path: Path, lab: FaultLab
) -> None:
    """A reply aiosmtplib cannot parse raises SMTPResponseException at RCPT (neither a
    disconnect nor a timeout). That message waits for its next retry with 4.3.0 and the
    reason; the message after it is delivered in the same pass, over a fresh connection."""

    def rcpt_reply(address: str) -> str:
        return "this is not an SMTP reply" if address.startswith("garbled@") else "250 2.1.5 OK"

    async with (
        ScriptedPeer(rcpt_reply=rcpt_reply) as peer,
        peer_relay(tmp_path, lab, peer) as relay,
    ):
        garbled = await queue(relay, ["garbled@partner.test"], subject="garbled")
        fine = await queue(relay, ["fine@partner.test"], subject="fine")
        await run_until_idle(relay)

        row = await recipient(relay, garbled)
        assert row.status is Status.DEFERRED
        # A second attempt in this pass comes from the queue manager, not the agent: "fine"
        # got through after "garbled" failed, so the connector counts as back and its
        # deferred mail is made due at once (relay.qmgr.results, connector health), once.
        # Never more than that.
        assert row.attempts in (1, 2)
        assert row.next_attempt_at == relay.clock.now() + SCHEDULE[row.attempts - 1]
        assert row.last_error is not None
        assert row.last_error.code == "4.3.0"
        assert row.last_error.reply.startswith("451 4.3.0 Error: local error in processing (")
        assert "SMTPResponseException during RCPT" in row.last_error.reply
        assert (await recipient(relay, fine)).status is Status.DELIVERED
        assert peer.connections == 2
        assert [d.rcpt_tos for d in peer.received] == [("fine@partner.test",)]


# ---- the agent on its own -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "name"),
    [
        ('"a\rb"@partner.test', "CR"),
        ('"a\nb"@partner.test', "LF"),
        ('"a\r\nRCPT TO:<x@evil.test>"@partner.test', "CR"),
        ("a\x00b@partner.test", "NUL"),
        ('"a\tb"@partner.test', "TAB"),
        ("a\x1bb@partner.test", "U+001B"),
        ("a\x7fb@partner.test", "DEL"),
    ],
    ids=["cr", "lf", "crlf-injection", "nul", "tab", "esc", "del"],
)
async def test_a_recipient_smtp_cannot_carry_fails_at_rcpt_and_the_others_are_sent(
    address: str, name: str
) -> None:
    async with ScriptedPeer() as peer:
        parcel = Parcel(1, SENDER, ((1, "a@partner.test"), (2, address), (3, "b@partner.test")))
        got = await deliver_all(new_agent(), partner_route(peer.port), [parcel])

        results = got[1]
        assert results[1] is None and results[3] is None
        event = results[2]
        assert event is not None
        assert (event.stage, event.failure) == (Stage.RCPT, Failure.UNSENDABLE)
        assert f"holds a control character ({name})" in event.detail
        outcome = classify(event)
        assert outcome.permanent and outcome.code == "5.1.3"
        assert outcome.reply.isprintable()
        (got_message,) = peer.received
        assert got_message.rcpt_tos == ("a@partner.test", "b@partner.test")
        assert peer.sent_commands().count("RCPT") == 2
        assert "evil" not in " ".join(d.rcpt_tos[0] for d in peer.received)


async def test_a_sender_smtp_cannot_carry_fails_its_parcel_at_mail_and_the_next_is_sent() -> None:
    async with ScriptedPeer() as peer:
        parcels = [
            Parcel(1, '"bad\nsender"@contoso.test', ((1, "a@partner.test"), (2, "b@partner.test"))),
            Parcel(2, SENDER, ((3, "c@partner.test"),)),
        ]
        got = await deliver_all(new_agent(), partner_route(peer.port), parcels)

        for rid in (1, 2):
            event = got[1][rid]
            assert event is not None
            assert (event.stage, event.failure) == (Stage.MAIL, Failure.UNSENDABLE)
            assert event.detail.startswith("Sender address ")
            assert classify(event).code == "5.1.7"
        assert got[2] == {3: None}
        assert peer.sent_commands().count("MAIL") == 1
        assert [d.mail_from for d in peer.received] == [SENDER]


async def test_a_parcel_with_nothing_sendable_opens_no_connection() -> None:
    async with ScriptedPeer() as peer:
        got = await deliver_all(
            new_agent(), partner_route(peer.port), [Parcel(1, SENDER, ((1, POISON),))]
        )
        event = got[1][1]
        assert event is not None and event.failure is Failure.UNSENDABLE
        assert peer.connections == 0


async def test_a_poison_recipient_fails_for_good_even_while_the_destination_is_down() -> None:
    """Connection refused: the others wait (4.4.316), the one SMTP cannot carry is failed
    now; no retry could ever send it."""
    with closed_port() as down:
        parcels = [
            Parcel(1, SENDER, ((1, "a@partner.test"), (2, POISON))),
            Parcel(2, SENDER, ((3, "b@partner.test"),)),
        ]
        got = await deliver_all(new_agent(), partner_route(down.port), parcels)

    poisoned = got[1][2]
    assert poisoned is not None and poisoned.failure is Failure.UNSENDABLE
    for message, rid in ((1, 1), (2, 3)):
        event = got[message][rid]
        assert event is not None and event.failure is Failure.REFUSED
        assert not classify(event).permanent


async def test_a_path_over_256_octets_is_not_sent_and_one_of_256_is() -> None:
    """RFC 5321 section 4.5.3.1.3: 256 octets, "<" and ">" included."""
    domain = "@partner.test"
    longest = "a" * (MAX_PATH - 2 - len(domain)) + domain
    too_long = "b" + longest
    async with ScriptedPeer() as peer:
        got = await deliver_all(
            new_agent(),
            partner_route(peer.port),
            [Parcel(1, SENDER, ((1, longest), (2, too_long)))],
        )
        assert got[1][1] is None
        event = got[1][2]
        assert event is not None and event.failure is Failure.UNSENDABLE
        assert "path of 257 octets" in event.detail
        assert [d.rcpt_tos for d in peer.received] == [(longest,)]


async def test_a_garbled_reply_fails_its_parcel_alone_and_the_next_opens_a_new_connection() -> None:
    def rcpt_reply(address: str) -> str:
        return "garbage" if address.startswith("garbled@") else "250 2.1.5 OK"

    async with ScriptedPeer(rcpt_reply=rcpt_reply) as peer:
        parcels = [
            Parcel(1, SENDER, ((1, "a@partner.test"),)),
            Parcel(2, SENDER, ((2, "ok@partner.test"), (3, "garbled@partner.test"))),
            Parcel(3, SENDER, ((4, "c@partner.test"),)),
        ]
        agent = new_agent()
        got = await deliver_all(agent, partner_route(peer.port), parcels)

        assert got[1] == {1: None}
        assert got[3] == {4: None}
        for rid in (2, 3):  # ok@ was accepted but its DATA never went: it waits too
            event = got[2][rid]
            assert event is not None
            assert (event.stage, event.failure) == (Stage.RCPT, Failure.INTERNAL)
            assert "Malformed SMTP response line" in event.detail
            assert not classify(event).permanent
        assert peer.connections == 2
        assert [d.rcpt_tos for d in peer.received] == [("a@partner.test",), ("c@partner.test",)]
        assert agent.has_idle  # the second connection went back to the cache


async def test_a_content_read_that_fails_defers_that_parcel_alone() -> None:
    async def load(message: int) -> bytes:
        if message == 2:
            raise OSError("disk I/O error")
        return b"Subject: t\r\n\r\nhello\r\n"

    async with ScriptedPeer() as peer:
        parcels = [Parcel(n, SENDER, ((n, f"r{n}@partner.test"),)) for n in (1, 2, 3)]
        got = await deliver_all(new_agent(), partner_route(peer.port), parcels, load)

        assert got[1] == {1: None} and got[3] == {3: None}
        event = got[2][2]
        assert event is not None and event.failure is Failure.INTERNAL
        assert "disk I/O error" in event.detail
        assert peer.connections == 1


# ---- the check itself -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["", "alice@contoso.test", '"quoted name"@partner.test', "zoë@bücher.test", "a+b=c@x.test"],
    ids=["null-sender", "plain", "quoted-space", "utf8", "punctuation"],
)
def test_addresses_smtp_can_carry_pass(address: str) -> None:
    assert unsendable(address) is None


def test_an_address_that_is_not_utf8_is_unsendable() -> None:
    # A lone surrogate: how Python holds undecodable bytes (errors="surrogateescape").
    why = unsendable("caf\udce9@partner.test")
    assert why is not None and "not valid UTF-8" in why


def test_the_path_limit_counts_utf8_octets() -> None:
    local = "é" * 125  # 250 octets, 125 characters
    assert unsendable(local + "@x.test") is not None
    assert unsendable("e" * 125 + "@x.test") is None
