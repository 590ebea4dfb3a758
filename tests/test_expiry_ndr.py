"""Expiry and the NDR (issue 3, sections 4 and 5), end to end on a ManualClock.

A message that cannot be delivered expires `message_expiration` after it arrived; the
sender gets one RFC 3464 report per message, routed like any mail (into a local Maildir,
or through the on-premises connector), and a null sender gets none.
"""

from __future__ import annotations

import email.message
from pathlib import Path

import pytest

from relay.lab.faults import FaultLab
from relay.server import Relay
from relay.states import Status
from tests.delivery_support import (
    EXTERNAL_SENDER,
    ON_PREMISES,
    SENDER,
    ScriptedPeer,
    advance,
    enqueue,
    example_connectors,
    lab_config,
    maildir_messages,
    manual_relay,
    message,
    ndrs,
    recipient,
    run_once,
    submit,
)
from tests.helpers import make_message

pytestmark = pytest.mark.timeout(30)

EXPIRATION = 48 * 3600  # the example config's message_expiration
SUBJECT = "Quarterly report"


async def _expire(relay: Relay, queue_id: int) -> None:
    """Try once, then move the clock to the expiry and let the worker give up."""
    await run_once(relay)
    advance(relay, EXPIRATION - 1)
    await run_once(relay)
    for row in (await message(relay, queue_id)).recipients:
        assert row.status is Status.DEFERRED, "expired before message_expiration"
    advance(relay, 1)
    await run_once(relay)
    await run_once(relay)  # the NDR, queued by the pass above, is delivered by now


def _parts(ndr: email.message.EmailMessage) -> list[email.message.Message]:
    assert ndr.is_multipart()
    return list(ndr.iter_parts())


def _status_blocks(ndr: email.message.EmailMessage) -> list[email.message.Message]:
    status = _parts(ndr)[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, email.message.Message)]


async def test_an_expired_message_gets_the_matching_550_and_an_ndr(relay: Relay) -> None:
    content = make_message(
        subject=SUBJECT,
        sender=SENDER,
        to="user@refused.lab.test",
        headers={"Message-ID": "<q3@contoso.test>"},
    )
    queue_id = await submit(relay, to="user@refused.lab.test", content=content)
    await _expire(relay, queue_id)

    row = await recipient(relay, queue_id)
    assert row.status is Status.EXPIRED
    assert row.next_attempt_at is None
    assert row.last_error is not None
    assert row.last_error.reply == "550 5.4.316 Message expired, connection refused"
    assert row.last_error.code == "5.4.316"
    assert row.history[-1].reply == row.last_error.reply

    (bounce,) = await ndrs(relay)
    assert bounce.mail_from == ""
    assert bounce.subject == f"Undeliverable: {SUBJECT}"
    (to_sender,) = bounce.recipients
    assert to_sender.address == SENDER
    assert to_sender.connector == "mailbox"
    assert to_sender.status is Status.DELIVERED

    (ndr,) = maildir_messages(relay, SENDER)
    assert ndr["Return-Path"] == "<>"
    assert ndr["From"] == "postmaster@contoso.test"
    assert ndr["To"] == SENDER
    assert ndr["Subject"] == f"Undeliverable: {SUBJECT}"
    assert ndr["Auto-Submitted"] == "auto-replied"
    assert ndr["In-Reply-To"] == "<q3@contoso.test>"
    assert ndr.get_content_type() == "multipart/report"
    assert ndr.get_param("report-type") == "delivery-status"

    human, status, headers = _parts(ndr)
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"

    text = human.get_content()  # type: ignore[attr-defined]
    assert "user@refused.lab.test" in text
    assert "Diagnostic information for administrators" in text
    assert "Generating server: relay.contoso.test" in text
    assert "550 5.4.316 Message expired, connection refused" in text
    assert "450 4.4.316 Connection refused" in text  # the last attempts, with their times

    per_message, per_recipient = _status_blocks(ndr)
    assert per_message["Reporting-MTA"] == "dns;relay.contoso.test"
    assert per_message["Arrival-Date"]
    assert per_recipient["Final-Recipient"] == "rfc822;user@refused.lab.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.4.316"
    assert per_recipient["Diagnostic-Code"] == (
        "smtp;550 5.4.316 Message expired, connection refused"
    )
    assert per_recipient["Remote-MTA"] == "dns;refused.lab.test"

    original = headers.get_payload(decode=True)
    assert isinstance(original, bytes)
    assert f"Subject: {SUBJECT}".encode() in original
    assert b"Message-ID: <q3@contoso.test>" in original


async def test_a_second_pass_sends_no_second_ndr(relay: Relay) -> None:
    queue_id = await submit(relay, to="user@refused.lab.test")
    await _expire(relay, queue_id)
    advance(relay, 3600)
    await run_once(relay)
    assert len(await ndrs(relay)) == 1
    assert len(maildir_messages(relay, SENDER)) == 1


async def test_one_ndr_per_message_for_the_recipients_that_failed_together(relay: Relay) -> None:
    rcpts = ["one@refused.lab.test", "two@refused.lab.test"]
    queue_id = await submit(relay, to=rcpts)
    await _expire(relay, queue_id)

    (ndr,) = maildir_messages(relay, SENDER)
    finals = [b["Final-Recipient"] for b in _status_blocks(ndr)[1:]]
    assert finals == [f"rfc822;{r}" for r in rcpts]


async def test_a_null_sender_gets_no_ndr(relay: Relay) -> None:
    """Queued directly: the worker's side of RFC 5321 section 4.5.5 (never bounce a bounce)."""
    queue_id = await enqueue(relay, to="user@refused.lab.test", mail_from="")
    await _expire(relay, queue_id)

    row = await recipient(relay, queue_id)
    assert row.status is Status.EXPIRED
    assert await ndrs(relay) == []


async def test_a_null_sender_message_from_smtp_expires_without_an_ndr(relay: Relay) -> None:
    """The same through SMTP: `MAIL FROM:<>` must be accepted, and still gets no NDR."""
    queue_id = await submit(relay, to="user@refused.lab.test", mail_from="")
    await _expire(relay, queue_id)

    row = await recipient(relay, queue_id)
    assert row.status is Status.EXPIRED
    assert await ndrs(relay) == []


async def test_expiry_after_a_remote_reply_is_queue_expired(relay: Relay) -> None:
    queue_id = await submit(relay, to="user@rcpt-451.lab.test", subject="greylisted")
    await _expire(relay, queue_id)

    row = await recipient(relay, queue_id)
    assert row.status is Status.EXPIRED
    assert row.last_error is not None
    assert row.last_error.reply == "550 4.4.7 QUEUE.Expired; message expired"
    (ndr,) = maildir_messages(relay, SENDER)
    (_, per_recipient) = _status_blocks(ndr)
    assert per_recipient["Status"] == "4.4.7"
    assert per_recipient["Diagnostic-Code"] == "smtp;550 4.4.7 QUEUE.Expired; message expired"
    assert "451 4.7.1 Greylisted" in _parts(ndr)[0].get_content()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("mode", "line"),
    [
        ("timeout", "550 5.4.315 Message expired, connection timed out"),
        ("nxdomain", "550 5.4.312 Message expired, DNS query failed"),
        ("drop-in-data", "550 5.4.318 Message expired, connection was closed abruptly"),
        ("cert-expired", "550 5.7.320 Message expired, certificate validation failed"),
    ],
)
async def test_expiry_names_the_last_mail_flow_code(relay: Relay, mode: str, line: str) -> None:
    queue_id = await submit(relay, to=f"user@{mode}.lab.test")
    await _expire(relay, queue_id)
    row = await recipient(relay, queue_id)
    assert row.last_error is not None
    assert row.last_error.reply == line


async def test_an_ndr_to_an_on_premises_sender_takes_the_on_premises_connector(
    tmp_path: Path, lab: FaultLab
) -> None:
    sender = "bob@onprem.contoso.test"
    async with ScriptedPeer() as onprem:
        (to_onprem,) = [c for c in example_connectors() if c["name"] == ON_PREMISES]
        to_onprem |= {"smart_hosts": [f"127.0.0.1:{onprem.port}"], "tls": "none"}
        config = lab_config(tmp_path / "onprem", lab, example=[to_onprem])
        async with manual_relay(config) as relay:
            queue_id = await submit(
                relay, to="user@refused.lab.test", mail_from=sender, subject="from on-prem"
            )
            await _expire(relay, queue_id)

            (bounce,) = await ndrs(relay)
            (to_sender,) = bounce.recipients
            assert to_sender.address == sender
            assert to_sender.connector == ON_PREMISES
            assert to_sender.status is Status.DELIVERED
            (got,) = onprem.received
            assert got.mail_from == ""
            assert got.rcpt_tos == (sender,)
            assert b"Subject: Undeliverable: from on-prem" in got.data


async def test_an_external_sender_gets_its_ndr_by_mx(relay: Relay) -> None:
    queue_id = await submit(relay, to="user@refused.lab.test", mail_from=EXTERNAL_SENDER)
    await _expire(relay, queue_id)
    (bounce,) = await ndrs(relay)
    (to_sender,) = bounce.recipients
    assert to_sender.address == EXTERNAL_SENDER
    assert to_sender.connector == "mx"
