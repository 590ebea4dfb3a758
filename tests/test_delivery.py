"""Delivery end to end, in process: the relay sends to real misbehaving peers on loopback.

Each test starts the lab peers (relay.lab.faults) and a relay on a ManualClock whose worker
runs only when the test calls `run_once()`; retries are reached by moving the clock.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import re
from pathlib import Path
from typing import Any

import pytest

from relay.agents import smtp
from relay.classify import RECIPIENT_NOT_FOUND
from relay.config import DomainType
from relay.lab.faults import (
    EXPECTED,
    GREETING_421_REPLY,
    RCPT_451_REPLY,
    RCPT_550_REPLY,
    DnsFault,
    Fault,
    FaultLab,
    lab_name,
)
from relay.server import Relay
from relay.spool.settings import DOMAIN_TYPE
from relay.states import Status
from relay.views import message_json
from tests.delivery_support import (
    EXTERNAL_SENDER,
    ON_PREMISES,
    SENDER,
    ScriptedPeer,
    advance,
    closed_port,
    connector,
    lab_config,
    maildir_messages,
    manual_relay,
    message,
    ndrs,
    recipient,
    run_once,
    store_of,
    submit,
)
from tests.helpers import send_data, smtp_client

pytestmark = pytest.mark.timeout(30)

SCHEDULE = [60, 300, 900, 1800, 3600]  # the example config's retry_schedule
DNS_MODES = {str(m) for m in DnsFault}
TITLES = {
    "4.4.312": "DNS query failed",
    "4.4.315": "Connection timed out",
    "4.4.316": "Connection refused",
    "4.4.317": "Cannot connect to remote server",
    "4.4.318": "Connection was closed abruptly",
    "4.7.320": "Certificate validation failed",
}
# For the certificate modes, the detail says which check failed.
CERT_DETAIL = {
    "cert-expired": "CertificateExpired",
    "cert-wrong-name": "SubjectMismatch",
    "cert-untrusted": "UntrustedRoot",
}


def _port(lab: FaultLab, mode: str) -> int | None:
    return None if mode in DNS_MODES else lab.servers[Fault(mode)].port


def _led_pattern(lab: FaultLab, mode: str, code: str) -> str:
    """Exchange's LED: `450 4.4.3xx Title [Message=...] [LastAttemptedServerName=...] [IP]`."""
    server = re.escape(lab_name(Fault(mode) if mode not in DNS_MODES else DnsFault(mode)))
    head = rf"^450 {re.escape(code)} {re.escape(TITLES[code])} \[Message=[^\]]+\]"
    tail = rf" \[LastAttemptedServerName={server}\]"
    port = _port(lab, mode)
    if port is not None:
        tail += rf" \[LastAttemptedIP=127\.0\.0\.1:{port}\]"
    return head + tail + "$"


# ---- every lab mode -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(EXPECTED))
async def test_each_lab_mode_gives_its_code(relay: Relay, lab: FaultLab, mode: str) -> None:
    address = f"user@{mode}.lab.test"
    queue_id = await submit(relay, to=address, subject=f"to {mode}")
    await run_once(relay)

    row = await recipient(relay, queue_id)
    expected = EXPECTED[mode]
    assert row.connector == f"Lab {mode}"
    assert row.attempts == 1
    if not expected:  # good: delivered over TLS with a valid certificate
        assert row.status is Status.DELIVERED
        assert row.last_error is None
        (got,) = lab.servers[Fault.GOOD].received
        assert got.rcpt_tos == (address,) and got.mail_from == SENDER and got.tls
        return

    error = row.last_error
    assert error is not None
    assert error.code == expected, error.reply
    assert [a.reply for a in row.history] == [error.reply]
    if mode == Fault.RCPT_550:
        assert row.status is Status.FAILED
        assert row.next_attempt_at is None
        assert error.reply.startswith(RCPT_550_REPLY + " [LastAttemptedServerName=")
        (bounce,) = await ndrs(relay)
        assert bounce.subject == f"Undeliverable: to {mode}"
        assert [r.address for r in bounce.recipients] == [SENDER]
        return

    assert row.status is Status.DEFERRED
    assert row.next_attempt_at == relay.clock.now() + SCHEDULE[0]
    assert await ndrs(relay) == []
    port = _port(lab, mode)
    if mode == Fault.RCPT_451:  # any other 4xx: the remote's reply, verbatim
        assert error.reply == (
            f"{RCPT_451_REPLY} [LastAttemptedServerName={lab_name(Fault.RCPT_451)}] "
            f"[LastAttemptedIP=127.0.0.1:{port}]"
        )
        return
    assert re.match(_led_pattern(lab, mode, expected), error.reply), error.reply
    if mode in DNS_MODES:
        assert "LastAttemptedIP" not in error.reply
        assert error.ip is None
    else:
        assert error.ip == f"127.0.0.1:{port}"
        assert error.server == lab_name(Fault(mode))
    if mode == Fault.GREETING_421:
        assert f"[Message={GREETING_421_REPLY}]" in error.reply
    if mode in CERT_DETAIL:
        assert f"[Message={CERT_DETAIL[mode]}" in error.reply
    if mode == Fault.NO_STARTTLS:
        assert "STARTTLS" in error.reply


async def test_history_grows_with_each_attempt(relay: Relay) -> None:
    queue_id = await submit(relay, to="user@refused.lab.test")
    await run_once(relay)
    advance(relay, SCHEDULE[0])
    await run_once(relay)

    row = await recipient(relay, queue_id)
    assert row.attempts == 2
    assert [a.code for a in row.history] == ["4.4.316", "4.4.316"]
    assert row.history[1].at - row.history[0].at == SCHEDULE[0]
    shown = message_json(await message(relay, queue_id), history=True)
    (rcpt,) = shown["recipients"]
    assert len(rcpt["history"]) == 2
    assert rcpt["last_error"]["code"] == "4.4.316"
    assert rcpt["history"][-1]["reply"] == rcpt["last_error"]["reply"]


async def test_retry_times_follow_the_schedule_and_the_last_interval_repeats(
    relay: Relay,
) -> None:
    queue_id = await submit(relay, to="user@refused.lab.test")
    await run_once(relay)
    attempts = 1
    for interval in [*SCHEDULE, SCHEDULE[-1], SCHEDULE[-1]]:
        row = await recipient(relay, queue_id)
        assert row.next_attempt_at == relay.clock.now() + interval
        advance(relay, interval - 1)
        await run_once(relay)
        assert (await recipient(relay, queue_id)).attempts == attempts, "tried before it was due"
        advance(relay, 1)
        await run_once(relay)
        attempts += 1
        row = await recipient(relay, queue_id)
        assert row.attempts == attempts, f"not tried when due after {interval}s"
        assert len(row.history) == attempts
        assert row.status is Status.DEFERRED


async def test_a_recipient_domain_that_does_not_exist_fails_at_once(relay: Relay) -> None:
    queue_id = await submit(relay, to="user@nosuch.test", subject="typo")
    await run_once(relay)

    row = await recipient(relay, queue_id)
    assert row.status is Status.FAILED
    assert row.connector == "mx"
    assert row.last_error is not None
    assert row.last_error.reply == "550 5.4.310 DNS domain nosuch.test does not exist"
    assert row.last_error.code == "5.4.310"
    (bounce,) = await ndrs(relay)
    assert bounce.subject == "Undeliverable: typo"
    (ndr,) = maildir_messages(relay, SENDER)
    assert "Status: 5.4.310" in ndr.as_string()


# ---- what the good peer receives --------------------------------------------------------------


async def test_the_good_peer_receives_the_message_byte_identical_but_for_received(
    relay: Relay, lab: FaultLab
) -> None:
    content = (
        "Message-ID: <byte-identical@fabrikam.test>\r\n"
        "Date: Fri, 15 Jan 2027 08:00:00 +0000\r\n"
        "From: Zoë <sender@fabrikam.test>\r\n"
        "To: user@good.lab.test\r\n"
        "Subject: =?utf-8?q?caf=C3=A9?=\r\n"
        "X-Folded: one\r\n\ttwo  \r\n"
        "\r\n"
        ".a line that starts with a dot\r\n"
        "..two dots\r\n"
        "8-bit: grüße, 日本語\r\n"
        "trailing spaces   \r\n"
        "\r\n"
        "last line\r\n"
    ).encode()
    async with smtp_client(relay.port) as client:
        await client.mail(EXTERNAL_SENDER, options=["BODY=8BITMIME"])
        await client.rcpt("user@good.lab.test")
        reply = await send_data(client, content)
        await client.quit()
    assert reply.code == 250, reply
    await run_once(relay)

    (got,) = lab.servers[Fault.GOOD].received
    assert got.data.endswith(content)
    added = got.data[: -len(content)]
    assert added.startswith(b"Received: from ")
    assert added.endswith(b"\r\n")
    # One header field: every further line is a folded continuation.
    lines = added.removesuffix(b"\r\n").split(b"\r\n")
    assert all(line[:1] in (b" ", b"\t") for line in lines[1:]), added
    assert b" by relay.contoso.test " in added


async def test_a_local_mailbox_recipient_lands_in_its_maildir(relay: Relay) -> None:
    content = b"Message-ID: <local@fabrikam.test>\r\nSubject: for alice\r\n\r\nhi alice\r\n"
    queue_id = await submit(relay, to=SENDER, mail_from=EXTERNAL_SENDER, content=content)
    await run_once(relay)

    row = await recipient(relay, queue_id)
    assert row.status is Status.DELIVERED
    assert row.connector == "mailbox"
    root = relay.loaded.path(relay.config.mailboxes.path)
    (name,) = list((root / SENDER / "new").iterdir())
    (delivered,) = maildir_messages(relay, SENDER)
    assert delivered["Return-Path"] == f"<{EXTERNAL_SENDER}>"
    assert delivered["Delivered-To"] == SENDER
    assert delivered["Subject"] == "for alice"
    assert delivered.get_content() == "hi alice\n"
    assert name.read_bytes().endswith(b"hi alice\n")


# ---- sessions: recipients, reuse, TLS ---------------------------------------------------------


def _peer_relay(
    tmp_path: Path, lab: FaultLab, peer: ScriptedPeer, **options: Any
) -> contextlib.AbstractAsyncContextManager[Relay]:
    """A relay whose connector "Partner" sends partner.test to `peer`."""
    partner = connector("Partner", "partner.test", peer.port, **options)
    return manual_relay(lab_config(tmp_path / "peer", lab, connectors=[partner]))


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelining"])
async def test_several_recipients_in_one_transaction_get_their_own_results(
    tmp_path: Path, lab: FaultLab, monkeypatch: pytest.MonkeyPatch, pipelining: bool
) -> None:
    """One accepted, one refused with 550: one delivered, one failed with an NDR.

    With PIPELINING (RFC 2920, offered by Postfix and Exchange) the replies to MAIL and the
    RCPTs arrive together; the relay must read every one of them. A short command timeout
    keeps a relay that loses them from stalling the suite for a minute.
    """
    monkeypatch.setattr(smtp, "COMMAND_TIMEOUT", 3.0)

    def rcpt_reply(address: str) -> str:
        return "550 5.1.1 User unknown" if address.startswith("nobody@") else "250 2.1.5 OK"

    peer = ScriptedPeer(rcpt_reply=rcpt_reply, pipelining=pipelining)
    async with peer, _peer_relay(tmp_path, lab, peer) as relay:
        queue_id = await submit(relay, to=["one@partner.test", "nobody@partner.test"])
        await run_once(relay)

        ok = await recipient(relay, queue_id, "one@partner.test")
        bad = await recipient(relay, queue_id, "nobody@partner.test")
        assert ok.last_error is None, ok.last_error.reply
        assert ok.status is Status.DELIVERED
        assert bad.status is Status.FAILED
        assert bad.last_error is not None
        assert bad.last_error.reply.startswith("550 5.1.1 User unknown [LastAttempted")
        assert peer.connections == 1
        (got,) = peer.received
        assert got.rcpt_tos == ("one@partner.test",)
        assert peer.sent_commands().count("MAIL") == 1
        # The NDR names only the failed recipient, and reaches alice's Maildir.
        (ndr,) = maildir_messages(relay, SENDER)
        report = ndr.as_string()
        assert "Final-Recipient: rfc822;nobody@partner.test" in report
        assert "Final-Recipient: rfc822;one@partner.test" not in report


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        ("452 4.3.1 Insufficient system storage", Status.DEFERRED),
        ("554 5.6.0 Message content rejected", Status.FAILED),
    ],
)
async def test_the_reply_to_data_decides_for_every_accepted_recipient(
    tmp_path: Path, lab: FaultLab, reply: str, status: Status
) -> None:
    peer = ScriptedPeer(data_reply=reply)
    async with peer, _peer_relay(tmp_path, lab, peer) as relay:
        queue_id = await submit(relay, to=["a@partner.test", "b@partner.test"])
        await run_once(relay)

        for address in ("a@partner.test", "b@partner.test"):
            row = await recipient(relay, queue_id, address)
            assert row.status is status
            assert row.last_error is not None
            assert row.last_error.reply.startswith(reply + " [LastAttemptedServerName=")
            assert row.last_error.code == reply.split()[1]
        assert len(await ndrs(relay)) == (1 if status is Status.FAILED else 0)


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA", "."])
async def test_a_server_that_stops_answering_is_given_up_on_and_not_reused(
    tmp_path: Path, lab: FaultLab, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """A hung server (connected, silent at one command) costs one command timeout: the
    recipient is deferred with 4.4.315 and the stage in the reply, and the next message
    opens a new connection instead of reusing the hung one (and takes the deferred one
    along: the connector is back)."""
    monkeypatch.setattr(smtp, "COMMAND_TIMEOUT", 1.0)
    monkeypatch.setattr(smtp, "DATA_TIMEOUT", 1.0)
    async with ScriptedPeer(silent_at=stage) as peer, _peer_relay(tmp_path, lab, peer) as relay:
        first = await submit(relay, to="a@partner.test", subject="first")
        await run_once(relay)
        row = await recipient(relay, first)
        assert row.status is Status.DEFERRED
        assert row.last_error is not None
        assert row.last_error.code == "4.4.315"
        what = {"MAIL": "MAIL", "RCPT": "RCPT", "DATA": "DATA", ".": "DATA"}[stage]
        assert f"did not answer {what} in time" in row.last_error.reply
        assert peer.commands[0][-1] == stage

        second = await submit(relay, to="b@partner.test", subject="second")
        await run_once(relay)
        assert (await recipient(relay, second)).status is Status.DELIVERED
        assert peer.connections == 2
        # The connector is back: its deferred mail goes at once, after the new message.
        assert (await recipient(relay, first)).status is Status.DELIVERED
        assert [d.rcpt_tos for d in peer.received] == [("b@partner.test",), ("a@partner.test",)]


async def test_one_ndr_per_message_for_recipients_failing_in_one_pass(relay: Relay) -> None:
    """Two recipients of one message, two routes, both refused for good in the same pass."""
    queue_id = await submit(relay, to=["user@rcpt-550.lab.test", "user@nosuch.test"])
    await run_once(relay)

    rows = (await message(relay, queue_id)).recipients
    assert [r.status for r in rows] == [Status.FAILED, Status.FAILED]
    (ndr,) = maildir_messages(relay, SENDER)
    report = ndr.as_string()
    assert "Final-Recipient: rfc822;user@rcpt-550.lab.test" in report
    assert "Final-Recipient: rfc822;user@nosuch.test" in report


async def test_two_messages_to_one_destination_share_one_connection(
    tmp_path: Path, lab: FaultLab
) -> None:
    async with ScriptedPeer() as peer, _peer_relay(tmp_path, lab, peer) as relay:
        first = await submit(relay, to="a@partner.test", subject="first")
        second = await submit(relay, to="b@partner.test", subject="second")
        await run_once(relay)

        for queue_id in (first, second):
            assert (await recipient(relay, queue_id)).status is Status.DELIVERED
        assert peer.connections == 1
        assert [d.rcpt_tos for d in peer.received] == [("a@partner.test",), ("b@partner.test",)]
        assert peer.commands[0].count("MAIL") == 2


async def test_opportunistic_tls_falls_back_to_plain_text_when_the_handshake_fails(
    tmp_path: Path, lab: FaultLab
) -> None:
    async with (
        ScriptedPeer(starttls="broken") as peer,
        _peer_relay(tmp_path, lab, peer, tls="opportunistic") as relay,
    ):
        queue_id = await submit(relay, to="a@partner.test")
        await run_once(relay)

        assert (await recipient(relay, queue_id)).status is Status.DELIVERED
        assert peer.connections == 2
        broken, plain = peer.commands
        assert broken == ["EHLO", "STARTTLS"]
        assert "STARTTLS" not in plain
        assert "DATA" in plain
        (got,) = peer.received
        assert got.rcpt_tos == ("a@partner.test",)


@pytest.mark.parametrize("tls", ["encryption_only", "certificate_validation"])
async def test_required_tls_does_not_fall_back(tmp_path: Path, lab: FaultLab, tls: str) -> None:
    async with (
        ScriptedPeer(starttls="broken") as peer,
        _peer_relay(tmp_path, lab, peer, tls=tls) as relay,
    ):
        queue_id = await submit(relay, to="a@partner.test")
        await run_once(relay)

        row = await recipient(relay, queue_id)
        assert row.status is Status.DEFERRED
        assert row.last_error is not None
        assert row.last_error.code == "4.4.317", row.last_error.reply
        assert peer.received == []
        assert "MAIL" not in peer.sent_commands()


async def test_tls_none_never_sends_starttls(tmp_path: Path, lab: FaultLab) -> None:
    async with (
        ScriptedPeer(starttls="broken") as peer,  # offers STARTTLS
        _peer_relay(tmp_path, lab, peer, tls="none") as relay,
    ):
        queue_id = await submit(relay, to="a@partner.test")
        await run_once(relay)

        assert (await recipient(relay, queue_id)).status is Status.DELIVERED
        assert "STARTTLS" not in peer.sent_commands()
        assert peer.connections == 1


# ---- several smart hosts --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "code"),
    [(["dns", "refused"], "4.4.316"), (["refused", "dns"], "4.4.312")],
)
async def test_the_error_kept_is_the_last_host_tried(
    tmp_path: Path, lab: FaultLab, order: list[str], code: str
) -> None:
    hosts = {
        "dns": f"{lab_name(DnsFault.NXDOMAIN)}:25",
        "refused": f"127.0.0.1:{lab.servers[Fault.REFUSED].port}",
    }
    partner = connector("Partner", "partner.test", 0)
    partner["smart_hosts"] = [hosts[h] for h in order]
    async with manual_relay(lab_config(tmp_path / "c", lab, connectors=[partner])) as relay:
        queue_id = await submit(relay, to="a@partner.test")
        await run_once(relay)
        row = await recipient(relay, queue_id)
        assert row.last_error is not None
        assert row.last_error.code == code, row.last_error.reply


async def test_a_failing_smart_host_is_skipped_for_the_next_one(
    tmp_path: Path, lab: FaultLab
) -> None:
    async with ScriptedPeer() as peer:
        partner = connector("Partner", "partner.test", peer.port)
        refused = lab.servers[Fault.REFUSED].port
        partner["smart_hosts"] = [f"127.0.0.1:{refused}", f"127.0.0.1:{peer.port}"]
        async with manual_relay(lab_config(tmp_path / "c", lab, connectors=[partner])) as relay:
            queue_id = await submit(relay, to="a@partner.test")
            await run_once(relay)
            assert (await recipient(relay, queue_id)).status is Status.DELIVERED
            assert len(peer.received) == 1


# ---- when a destination comes back ----------------------------------------------------------


async def test_queued_mail_goes_in_arrival_order_when_the_destination_comes_back(
    tmp_path: Path, lab: FaultLab
) -> None:
    with closed_port() as closed:
        partner = connector("Partner", "partner.test", closed.port)
        config = lab_config(tmp_path / "c", lab, connectors=[partner])
        async with manual_relay(config) as relay:
            ids = []
            for n in range(5):  # arrivals 10 s apart: their retries fall due 10 s apart too
                ids.append(await submit(relay, to=f"r{n}@partner.test", subject=f"message {n}"))
                await run_once(relay)
                advance(relay, 10)
            for queue_id in ids:
                row = await recipient(relay, queue_id)
                assert row.status is Status.DEFERRED
                assert row.last_error is not None and row.last_error.code == "4.4.316"

            closed.release()
            async with ScriptedPeer(port=closed.port) as peer:
                # Only the first message's retry is due; its success brings the rest along.
                advance(relay, await _until_first_due(relay))
                assert len(await store_of(relay).due(now=relay.clock.now(), limit=10)) == 1
                await run_once(relay)

                subjects = [_subject(d.data) for d in peer.received]
                assert subjects == [f"message {n}" for n in range(5)]
                for queue_id in ids:
                    assert (await recipient(relay, queue_id)).status is Status.DELIVERED


async def _until_first_due(relay: Relay) -> float:
    due = await store_of(relay).next_due_after(relay.clock.now())
    assert due is not None
    return max(0.0, due - relay.clock.now())


def _subject(data: bytes) -> str:
    return str(email.message_from_bytes(data, policy=email.policy.default)["Subject"])


# ---- Fix now --------------------------------------------------------------------------------


async def test_fix_now_fails_queued_mail_for_unknown_recipients_at_once(relay: Relay) -> None:
    queue_id = await submit(relay, to="bob@onprem.contoso.test")
    await run_once(relay)
    row = await recipient(relay, queue_id)
    assert row.status is Status.DEFERRED and row.connector == ON_PREMISES

    await store_of(relay).set_setting(DOMAIN_TYPE("onprem.contoso.test"), DomainType.AUTHORITATIVE)
    await relay.refresh()
    advance(relay, SCHEDULE[0])
    await run_once(relay)

    row = await recipient(relay, queue_id)
    assert row.status is Status.FAILED
    assert row.last_error is not None and row.last_error.reply == RECIPIENT_NOT_FOUND
    assert len(await ndrs(relay)) == 1
