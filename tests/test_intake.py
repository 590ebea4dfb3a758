"""The SMTP front end over real sockets: EHLO, STARTTLS, Exchange Online's recipient rules,
limits, malformed commands, and the 250 that is sent only after the commit."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from email.header import Header
from typing import Any

import aiosmtplib
import pytest

from relay.headers import rfc5322_date
from relay.server import Relay
from relay.spool import writer
from relay.spool.rows import MessageRow
from tests.helpers import (
    QUEUED_RE,
    StartRelay,
    TlsFiles,
    command,
    make_message,
    queued_id,
    reply_text,
    send_data,
    send_mail,
    smtp_client,
)

pytestmark = pytest.mark.timeout(30)

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}\b")
RCPT_OK = "250 2.1.5 Recipient OK"
ACCESS_DENIED = "550 5.4.1 Recipient address rejected: Access denied"
RELAY_DENIED = "550 5.7.64 TenantAttribution; Relay Access Denied"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"


async def stored(relay: Relay, queue_id: int) -> MessageRow:
    assert relay.store is not None
    message = await relay.store.get_message(queue_id)
    assert message is not None, f"message {queue_id} is not in the store"
    return message


async def content_of(relay: Relay, queue_id: int) -> bytes:
    assert relay.store is not None
    return await relay.store.content(queue_id)


def ehlo_keywords(response: aiosmtplib.SMTPResponse) -> dict[str, str]:
    """EHLO lines after the greeting line, as {KEYWORD: parameters}."""
    lines = response.message.splitlines()[1:]
    return {line.split(" ", 1)[0].upper(): line.partition(" ")[2] for line in lines}


# ---- greeting and EHLO ------------------------------------------------------------------


async def test_greeting_is_220(relay_server: Relay) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay_server.port, start_tls=False)
    greeting = await client.connect()
    try:
        assert greeting.code == 220
        assert "relay.contoso.test" in greeting.message
    finally:
        client.close()


async def test_greeting_is_dated_by_the_relays_clock(relay_server: Relay) -> None:
    """The banner's date is the relay's time (the lab's clock), like every other date."""
    relay_server.clock.offset = 3600.0  # as `relay clock advance 1h` does
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay_server.port, start_tls=False)
    greeting = await client.connect()
    client.close()
    assert greeting.message.endswith(f" at {rfc5322_date(relay_server.clock.now())}")
    assert "Fri, 15 Jan 2027 09:00:00 +0000" in greeting.message  # the ManualClock, +1h


async def test_ehlo_advertises_extensions_without_starttls(start_relay: StartRelay) -> None:
    relay = await start_relay(smtp={"max_message_size": "10MB"})
    async with smtp_client(relay.port, ehlo=False) as client:
        response = await client.ehlo(hostname="client.fabrikam.test")
    keywords = ehlo_keywords(response)
    assert keywords["SIZE"] == "10000000"
    for extension in ("8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"):
        assert extension in keywords, response.message
    assert "STARTTLS" not in keywords
    assert "AUTH" not in keywords


async def test_ehlo_advertises_starttls_with_a_certificate(
    start_relay: StartRelay, tls_files: TlsFiles
) -> None:
    relay = await start_relay(smtp=tls_files.smtp_overrides())
    async with smtp_client(relay.port, ehlo=False) as client:
        response = await client.ehlo(hostname="client.fabrikam.test")
    assert "STARTTLS" in ehlo_keywords(response)


async def test_starttls_then_message_accepted(start_relay: StartRelay, tls_files: TlsFiles) -> None:
    relay = await start_relay(smtp=tls_files.smtp_overrides())
    async with smtp_client(relay.port, tls_context=tls_files.client_context()) as client:
        assert (await client.starttls()).code == 220
        assert client.get_transport_info("sslcontext") is not None
        await client.ehlo(hostname="client.fabrikam.test")
        await client.mail("sender@fabrikam.test")
        await client.rcpt("alice@contoso.test")
        reply = reply_text(await send_data(client, make_message()))
    queue_id = queued_id(reply)
    content = await content_of(relay, queue_id)
    assert b"with ESMTPS" in content.split(b"\r\n\r\n", 1)[0]


async def test_require_tls_refuses_mail_before_starttls(
    start_relay: StartRelay, tls_files: TlsFiles
) -> None:
    relay = await start_relay(smtp=tls_files.smtp_overrides(require_tls=True))
    async with smtp_client(relay.port, tls_context=tls_files.client_context()) as client:
        before = await command(client, "MAIL FROM:<sender@fabrikam.test>")
        assert before.code == 530
        assert before.message.startswith("5.7.0 ")
        await client.starttls()
        await client.ehlo(hostname="client.fabrikam.test")
        after = await command(client, "MAIL FROM:<sender@fabrikam.test>")
        assert after.code == 250, reply_text(after)
        await client.rcpt("alice@contoso.test")
        assert QUEUED_RE.match(reply_text(await send_data(client, make_message())))


# ---- recipients -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("alice@contoso.test", RCPT_OK),  # a listed mailbox of the authoritative domain
        ("ALICE@Contoso.Test", RCPT_OK),  # addresses compare without case
        ("bob@contoso.test", ACCESS_DENIED),  # unknown in the authoritative domain
        ("anyone@onprem.contoso.test", RCPT_OK),  # internal_relay: everything
        ("someone@fabrikam.test", RCPT_OK),  # foreign, and 127.0.0.1 is in relay_networks
    ],
)
async def test_recipient_rules(relay_server: Relay, address: str, expected: str) -> None:
    async with smtp_client(relay_server.port) as client:
        await client.mail("sender@fabrikam.test")
        reply = await command(client, f"RCPT TO:<{address}>")
    assert reply_text(reply) == expected


async def test_foreign_domain_refused_outside_relay_networks(start_relay: StartRelay) -> None:
    relay = await start_relay(smtp={"relay_networks": ["10.0.0.0/8"]})
    async with smtp_client(relay.port) as client:
        await client.mail("sender@fabrikam.test")
        assert reply_text(await command(client, "RCPT TO:<x@fabrikam.test>")) == RELAY_DENIED
        # Accepted domains do not depend on relay_networks.
        assert reply_text(await command(client, "RCPT TO:<alice@contoso.test>")) == RCPT_OK
        assert reply_text(await command(client, "RCPT TO:<y@onprem.contoso.test>")) == RCPT_OK
        reply = reply_text(await send_data(client, make_message()))
    message = await stored(relay, queued_id(reply))
    assert [r.address for r in message.recipients] == [
        "alice@contoso.test",
        "y@onprem.contoso.test",
    ]


async def test_too_many_recipients_and_the_first_ones_still_go(start_relay: StartRelay) -> None:
    relay = await start_relay(smtp={"max_recipients": 3})
    addresses = ["a@onprem.contoso.test", "b@onprem.contoso.test", "c@onprem.contoso.test"]
    async with smtp_client(relay.port) as client:
        await client.mail("sender@fabrikam.test")
        for address in addresses:
            assert reply_text(await command(client, f"RCPT TO:<{address}>")) == RCPT_OK
        fourth = await command(client, "RCPT TO:<d@onprem.contoso.test>")
        assert reply_text(fourth) == "452 4.5.3 Too many recipients"
        reply = reply_text(await send_data(client, make_message()))
    message = await stored(relay, queued_id(reply))
    assert [r.address for r in message.recipients] == addresses


# ---- size limits ------------------------------------------------------------------------


async def test_mail_size_parameter_above_the_limit(start_relay: StartRelay) -> None:
    relay = await start_relay(smtp={"max_message_size": "10KB"})
    async with smtp_client(relay.port) as client:
        too_big = await command(client, "MAIL FROM:<sender@fabrikam.test> SIZE=10001")
        assert reply_text(too_big) == TOO_BIG
        fits = await command(client, "MAIL FROM:<sender@fabrikam.test> SIZE=10000")
        assert fits.code == 250


async def test_data_growing_past_the_limit_then_session_goes_on(start_relay: StartRelay) -> None:
    relay = await start_relay(smtp={"max_message_size": "10KB"})
    big = make_message(body=("x" * 78 + "\r\n") * 640)  # about 50 KB
    assert len(big) > 50_000
    async with smtp_client(relay.port) as client:
        await client.mail("sender@fabrikam.test")
        await client.rcpt("alice@contoso.test")
        assert reply_text(await send_data(client, big)) == TOO_BIG
        # The session goes on: a following transaction is accepted.
        await client.mail("sender@fabrikam.test")
        await client.rcpt("alice@contoso.test")
        reply = reply_text(await send_data(client, make_message(subject="small")))
    queue_id = queued_id(reply)
    assert relay.store is not None
    rows = await relay.store.query("SELECT id, subject FROM messages")
    assert rows == [(queue_id, "small")]


# ---- malformed commands -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("needs_mail", "line", "expected_code"),
    [
        (False, "MAIL FROM:<bad address", "5"),
        (False, "MAIL FROM:<bad address>", "5"),
        (False, "RCPT TO:<alice@contoso.test>", "503"),  # RCPT before MAIL
        (False, "FOO bar", "500"),
        (True, "RCPT TO:<no-at-sign>", "5"),
        (True, "RCPT TO:<alice@contoso.test", "5"),
        (False, "DATA", "503"),  # DATA before MAIL
        (False, "MAIL TO:<sender@fabrikam.test>", "5"),
    ],
)
async def test_malformed_commands_get_5xx_and_the_session_goes_on(
    relay_server: Relay, needs_mail: bool, line: str, expected_code: str
) -> None:
    async with smtp_client(relay_server.port) as client:
        if needs_mail:
            await client.mail("sender@fabrikam.test")
        reply = await command(client, line)
        assert str(reply.code).startswith(expected_code), reply_text(reply)
        assert ENHANCED.match(reply.message), f"no enhanced status code: {reply_text(reply)!r}"
        await client.rset()
        await client.mail("sender@fabrikam.test")
        await client.rcpt("alice@contoso.test")
        assert QUEUED_RE.match(reply_text(await send_data(client, make_message())))


async def test_every_reply_after_ehlo_has_an_enhanced_code(relay_server: Relay) -> None:
    """RFC 2034 section 3: once ENHANCEDSTATUSCODES is advertised, every reply carries one."""
    async with smtp_client(relay_server.port) as client:
        for line in ("NOOP", "RSET", "VRFY alice@contoso.test", "HELP", "MAIL FROM:<a@b.test>"):
            reply = await command(client, line)
            assert ENHANCED.match(reply.message), f"{line}: {reply_text(reply)!r}"
        quit_reply = await command(client, "QUIT")
        assert quit_reply.code == 221
        assert ENHANCED.match(quit_reply.message), reply_text(quit_reply)


# ---- acceptance -------------------------------------------------------------------------


async def test_null_sender_is_accepted_and_stored_empty(relay_server: Relay) -> None:
    async with smtp_client(relay_server.port) as client:
        assert (await command(client, "MAIL FROM:<>")).code == 250
        await client.rcpt("alice@contoso.test")
        reply = reply_text(await send_data(client, make_message()))
    message = await stored(relay_server, queued_id(reply))
    assert message.mail_from == ""


async def test_final_reply_and_the_stored_envelope(relay_server: Relay) -> None:
    rcpts = ["alice@contoso.test", "admin@contoso.test", "ops@onprem.contoso.test"]
    reply = await send_mail(relay_server.port, rcpt_tos=rcpts, mail_from="boss@fabrikam.test")
    match = QUEUED_RE.match(reply)
    assert match, reply
    message = await stored(relay_server, int(match.group(1)))
    assert message.mail_from == "boss@fabrikam.test"
    assert [r.address for r in message.recipients] == rcpts
    assert {r.status.value for r in message.recipients} == {"queued"}
    assert [r.connector for r in message.recipients] == ["mailbox", "mailbox", "To on-premises"]
    assert message.received_at == relay_server.clock.now()
    assert message.client_address == "127.0.0.1"
    assert message.client_helo == "client.fabrikam.test"
    assert f"<{message.message_id.strip('<>')}>" in reply


async def test_received_message_id_and_date_are_added_and_the_rest_is_untouched(
    relay_server: Relay,
) -> None:
    original = make_message(subject="plain", body="line one\r\n\r\n.leading dot\r\nend\r\n")
    reply = await send_mail(relay_server.port, content=original)
    queue_id = queued_id(reply)
    content = await content_of(relay_server, queue_id)
    assert content.startswith(
        b"Received: from client.fabrikam.test ([127.0.0.1]) by relay.contoso.test"
    )
    assert content.endswith(original), "the client's message must follow the added headers intact"
    added = content[: -len(original)].decode()
    assert f" id {queue_id}" in added
    assert re.search(r"^Message-ID: <[^>]+>\r$", added, re.M), added
    assert re.search(r"^Date: ", added, re.M), added
    message = await stored(relay_server, queue_id)
    assert f"Message-ID: {message.message_id}\r\n" in added
    assert message.message_id in reply
    assert message.size == len(content)


async def test_existing_message_id_and_date_are_kept(relay_server: Relay) -> None:
    original = make_message(
        headers={"Message-ID": "<kept.1@fabrikam.test>", "Date": "Mon, 2 Jun 2025 10:00:00 +0000"}
    )
    reply = await send_mail(relay_server.port, content=original)
    assert "<kept.1@fabrikam.test> [InternalId=" in reply
    queue_id = queued_id(reply)
    content = await content_of(relay_server, queue_id)
    assert content.endswith(original)
    added = content[: -len(original)]
    assert b"Message-ID:" not in added
    assert b"\r\nDate:" not in added and not added.startswith(b"Date:")
    assert added.count(b"\r\n") == 2 and added.startswith(b"Received: ")  # the Received only
    assert (await stored(relay_server, queue_id)).message_id == "<kept.1@fabrikam.test>"


async def test_utf8_subject_is_decoded_in_the_store(relay_server: Relay) -> None:
    subject = "Grüße aus Köln – 東京"
    encoded = Header(subject, "utf-8").encode()
    assert encoded.startswith("=?utf-8?")
    reply = await send_mail(relay_server.port, content=make_message(subject=encoded))
    assert (await stored(relay_server, queued_id(reply))).subject == subject


async def test_smtputf8_with_non_ascii_addresses(relay_server: Relay) -> None:
    sender, rcpt = "jörg@fabrikam.test", "用户@onprem.contoso.test"
    content = f"From: {sender}\r\nTo: {rcpt}\r\nSubject: hi\r\n\r\nHallo\r\n".encode()
    async with smtp_client(relay_server.port) as client:
        assert client.supports_extension("smtputf8")
        await client.mail(sender, options=["SMTPUTF8"], encoding="utf-8")
        await client.rcpt(rcpt, encoding="utf-8")
        reply = reply_text(await send_data(client, content))
    queue_id = queued_id(reply)
    message = await stored(relay_server, queue_id)
    assert message.mail_from == sender
    assert [r.address for r in message.recipients] == [rcpt]
    content_stored = await content_of(relay_server, queue_id)
    assert content_stored.endswith(content)
    assert b" with UTF8SMTP id " in content_stored  # RFC 6531 section 4.3


async def test_raw_utf8_subject_is_decoded_in_the_store(relay_server: Relay) -> None:
    """RFC 6532: an SMTPUTF8 message may carry UTF-8 in its headers without RFC 2047."""
    content = "From: jörg@fabrikam.test\r\nSubject: Grüße aus Köln\r\n\r\nHallo\r\n".encode()
    async with smtp_client(relay_server.port) as client:
        await client.mail("jörg@fabrikam.test", options=["SMTPUTF8"], encoding="utf-8")
        await client.rcpt("alice@contoso.test")
        reply = reply_text(await send_data(client, content))
    assert (await stored(relay_server, queued_id(reply))).subject == "Grüße aus Köln"


async def test_eight_bit_body_is_kept(relay_server: Relay) -> None:
    original = "Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nÄrger\r\n".encode()
    async with smtp_client(relay_server.port) as client:
        await command(client, "MAIL FROM:<sender@fabrikam.test> BODY=8BITMIME")
        await client.rcpt("alice@contoso.test")
        reply = reply_text(await send_data(client, original))
    assert (await content_of(relay_server, queued_id(reply))).endswith(original)


# ---- the store ----------------------------------------------------------------------------


async def test_store_failure_answers_451_and_leaves_nothing(
    relay_server: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_insert = writer._insert_messages

    async def insert_then_fail(conn: Any, messages: Any) -> None:
        await real_insert(conn, messages)  # the message rows are written, then the disk "fails"
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(writer, "_insert_messages", insert_then_fail)
    async with smtp_client(relay_server.port) as client:
        await client.mail("sender@fabrikam.test")
        await client.rcpt("alice@contoso.test")
        reply = await send_data(client, make_message(subject="lost"))
        assert reply.code == 451, reply_text(reply)
        assert reply.message.startswith("4.3.0 ")
        assert relay_server.store is not None
        assert await relay_server.store.query("SELECT id FROM messages") == []
        assert await relay_server.store.query("SELECT id FROM recipients") == []
        # Once the store works again, the same session can queue the message.
        monkeypatch.setattr(writer, "_insert_messages", real_insert)
        await client.mail("sender@fabrikam.test")
        await client.rcpt("alice@contoso.test")
        again = reply_text(await send_data(client, make_message(subject="retried")))
    queue_id = queued_id(again)
    assert (await stored(relay_server, queue_id)).subject == "retried"
    rows = await relay_server.store.query("SELECT count(*) FROM messages")
    assert rows == [(1,)]


async def test_concurrent_sessions_get_distinct_ids(relay_server: Relay) -> None:
    replies = await asyncio.gather(
        *(
            send_mail(relay_server.port, content=make_message(subject=f"concurrent {n}"))
            for n in range(20)
        )
    )
    ids = [queued_id(r) for r in replies]
    assert len(set(ids)) == 20
    for queue_id in ids:
        message = await stored(relay_server, queue_id)
        assert [r.address for r in message.recipients] == ["alice@contoso.test"]
    subjects = {(await stored(relay_server, i)).subject for i in ids}
    assert subjects == {f"concurrent {n}" for n in range(20)}


async def test_pipelined_transaction_in_one_write(relay_server: Relay) -> None:
    """RFC 2920: the client may send MAIL, RCPT... and DATA without waiting for replies."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay_server.port)
    try:
        assert (await reader.readline()).startswith(b"220")
        writer.write(b"EHLO client.fabrikam.test\r\n")
        while not (line := await reader.readline()).startswith(b"250 "):
            assert line.startswith(b"250-"), line
        writer.write(
            b"MAIL FROM:<sender@fabrikam.test>\r\nRCPT TO:<alice@contoso.test>\r\n"
            b"RCPT TO:<nobody@contoso.test>\r\nRCPT TO:<admin@contoso.test>\r\nDATA\r\n"
        )
        replies = [(await reader.readline()).decode().rstrip() for _ in range(5)]
        assert replies[:4] == ["250 2.1.0 Sender OK", RCPT_OK, ACCESS_DENIED, RCPT_OK]
        assert replies[4].startswith("354 ")
        writer.write(make_message() + b".\r\nQUIT\r\n")
        final = (await reader.readline()).decode().rstrip()
        assert (await reader.readline()).startswith(b"221 ")
    finally:
        writer.close()
    message = await stored(relay_server, queued_id(final))
    assert [r.address for r in message.recipients] == ["alice@contoso.test", "admin@contoso.test"]


async def test_message_id_without_angle_brackets_still_gives_the_exchange_reply(
    relay_server: Relay,
) -> None:
    original = make_message(headers={"Message-ID": "bare.1@fabrikam.test"})
    reply = await send_mail(relay_server.port, content=original)
    assert QUEUED_RE.match(reply), reply
    assert (await content_of(relay_server, queued_id(reply))).endswith(original)
