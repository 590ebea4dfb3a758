"""Hostile envelopes (issue 10, item 2) and routing syntax (item 5), over real sockets.

CR, LF, NUL, other control characters and invalid UTF-8 in EHLO/HELO, MAIL, RCPT and their
parameters are answered at that command and the session goes on; nothing of them reaches a
header, a file name, a log line unescaped, or the store. Clients that may not relay cannot
use sender-specified routing (`%`, `!`, a quoted `@`, a source route) through the tenant.

aiosmtplib refuses to send control characters, so these tests speak SMTP themselves
(`RawSession`, also used by tests/test_postmaster.py and tests/test_intake_limits.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.agents import maildir
from relay.server import Relay
from tests.delivery_support import maildir_messages
from tests.helpers import (
    HOST,
    QUEUED_RE,
    StartRelay,
    command,
    make_message,
    queued_id,
    reply_text,
    smtp_client,
)

pytestmark = pytest.mark.timeout(30)

BAD_HELO = "501 5.5.4 Invalid domain name"
BAD_SENDER = "501 5.1.7 Invalid address"
BAD_RECIPIENT = "501 5.1.3 Invalid address"
BAD_ARGUMENTS = "501 5.5.4 Invalid arguments"
RELAY_DENIED = "550 5.7.64 TenantAttribution; Relay Access Denied"
RCPT_OK = "250 2.1.5 Recipient OK"
# What must never appear in a reply, a log line or a stored header field: C0 controls,
# DEL, C1 controls and the lone surrogates that stand for undecodable bytes.
UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")


# ---- a client that sends exactly the bytes it is given --------------------------------------


class RawSession:
    """One SMTP connection, line by line, with no client-side checks (unlike aiosmtplib)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting = ""

    async def reply(self, timeout: float = 10) -> str:
        """The next complete reply, its lines joined by "\\n" (decoded, undecodable bytes
        shown as \\xNN); "" when the server has closed the connection."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                return "\n".join(lines)
            text = raw.decode("utf-8", "backslashreplace").removesuffix("\r\n")
            lines.append(text)
            if text[3:4] != "-":
                return "\n".join(lines)

    async def send(self, line: bytes, timeout: float = 10) -> str:
        """Send one command line (CRLF added) and return its reply."""
        self.writer.write(line + b"\r\n")
        return await self.reply(timeout)

    async def transaction(
        self, *, mail_from: str = "sender@fabrikam.test", to: str = "alice@contoso.test"
    ) -> str:
        """A clean MAIL, RCPT, DATA; returns the final reply (the session goes on)."""
        assert (await self.send(f"MAIL FROM:<{mail_from}>".encode())).startswith("250 ")
        assert (await self.send(f"RCPT TO:<{to}>".encode())) == RCPT_OK
        assert (await self.send(b"DATA")).startswith("354 ")
        self.writer.write(make_message(to=to) + b".\r\n")
        return await self.reply()

    async def closed(self, timeout: float = 10) -> bool:
        """True once the server has closed the connection (whatever it still sent)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except ConnectionError:
            pass
        return True


@contextlib.asynccontextmanager
async def raw_session(
    port: int, *, ehlo: bytes | None = b"client.fabrikam.test", source: str = HOST
) -> AsyncIterator[RawSession]:
    """A connected RawSession that has read the greeting and, by default, sent EHLO.

    `source` is the client's address: any of 127.0.0.0/8 on Linux, so one relay can see a
    client that may relay (say 127.0.0.2) and one that may not (127.0.0.1).
    """
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    session = RawSession(reader, writer)
    try:
        session.greeting = await session.reply()
        assert session.greeting.startswith("220 "), session.greeting
        if ehlo is not None:
            assert (await session.send(b"EHLO " + ehlo)).startswith("250-")
        yield session
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def message_count(relay: Relay) -> int:
    assert relay.store is not None
    ((count,),) = await relay.store.query("SELECT count(*) FROM messages")
    return int(count)


# ---- EHLO and HELO ----------------------------------------------------------------------------

HOSTILE_NAMES = [
    pytest.param(b"a\rX-Injected: yes", id="CR"),
    pytest.param(b"a\x00b.fabrikam.test", id="NUL"),
    pytest.param(b"a\x01b.fabrikam.test", id="SOH"),
    pytest.param(b"a\x1bb.fabrikam.test", id="ESC"),
    pytest.param(b"a\tb.fabrikam.test", id="TAB"),
    pytest.param(b"a\x7fb.fabrikam.test", id="DEL"),
    pytest.param(b"a\xc2\x85b.fabrikam.test", id="C1 NEL"),
    pytest.param(b"a\xffb.fabrikam.test", id="invalid UTF-8"),
    pytest.param(b"caf\xc3.fabrikam.test", id="truncated UTF-8"),
]


@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_a_hostile_helo_name_is_refused_and_the_session_goes_on(
    relay_server: Relay, verb: bytes, name: bytes
) -> None:
    async with raw_session(relay_server.port, ehlo=None) as session:
        assert await session.send(verb + b" " + name) == BAD_HELO
        assert (await session.send(b"EHLO client.fabrikam.test")).startswith("250-")
        final = await session.transaction()
    queue_id = queued_id(final)
    assert relay_server.store is not None
    stored = await relay_server.store.get_message(queue_id)
    assert stored is not None and stored.client_helo == "client.fabrikam.test"


async def test_a_cr_in_ehlo_never_becomes_a_header_line(relay_server: Relay) -> None:
    """The issue's case: `EHLO a<CR>X-Injected: yes` used to reach our Received header,
    which the next hop reads as two header lines."""
    async with raw_session(relay_server.port, ehlo=None) as session:
        assert await session.send(b"EHLO a\rX-Injected: yes") == BAD_HELO
        assert (await session.send(b"EHLO client.fabrikam.test")).startswith("250-")
        final = await session.transaction()
    assert relay_server.store is not None
    content = await relay_server.store.content(queued_id(final))
    head = content.split(b"\r\n\r\n", 1)[0]
    assert b"X-Injected" not in head
    assert b"\r" not in head.replace(b"\r\n", b"")


# ---- MAIL FROM ----------------------------------------------------------------------------------

HOSTILE_SENDERS = [
    pytest.param(b'<"a\rX-Evil: 1"@fabrikam.test>', id="CR in quotes"),
    pytest.param(b"<a\x00b@fabrikam.test>", id="NUL"),
    pytest.param(b'<"a\x00b"@fabrikam.test>', id="NUL in quotes"),
    pytest.param(b"<a\x01b@fabrikam.test>", id="SOH"),
    pytest.param(b'<"a\x1fb"@fabrikam.test>', id="US in quotes"),
    pytest.param(b"<a\x7fb@fabrikam.test>", id="DEL"),
    pytest.param(b"<a\xffb@fabrikam.test>", id="invalid UTF-8"),
    pytest.param(b"<j\xc3rg@fabrikam.test> SMTPUTF8", id="truncated UTF-8"),
    pytest.param(b"<a@fabrikam\x01.test>", id="control in the domain"),
]


@pytest.mark.parametrize("path", HOSTILE_SENDERS)
async def test_a_hostile_sender_is_refused_and_the_session_goes_on(
    relay_server: Relay, path: bytes
) -> None:
    async with raw_session(relay_server.port) as session:
        assert await session.send(b"MAIL FROM:" + path) == BAD_SENDER
        assert QUEUED_RE.match(await session.transaction())
    assert await message_count(relay_server) == 1


HOSTILE_MAIL_PARAMETERS = [
    pytest.param(b"SIZE=100\x1c", id="FS, which str.split() takes for a space"),
    pytest.param(b"\x0bBODY=8BITMIME", id="VT"),
    pytest.param(b"BODY=8BITMIME\x0cSIZE=100", id="FF"),
    pytest.param(b"SIZE=1\r00", id="CR"),
    # (At the very end of the line aiosmtpd strips CR, LF and ASCII whitespace itself.)
]


@pytest.mark.parametrize("parameters", HOSTILE_MAIL_PARAMETERS)
async def test_hostile_mail_parameters_are_refused(relay_server: Relay, parameters: bytes) -> None:
    async with raw_session(relay_server.port) as session:
        reply = await session.send(b"MAIL FROM:<sender@fabrikam.test> " + parameters)
        assert reply == BAD_ARGUMENTS
        assert QUEUED_RE.match(await session.transaction())


async def test_an_lf_splits_the_command_and_both_halves_are_refused(relay_server: Relay) -> None:
    """A bare LF ends a command line (aiosmtpd reads up to LF, as Postfix does by default),
    so an LF inside an address leaves two broken commands, each refused; the sender's half
    with the sender's code (X.1.7, RFC 3463), not aiosmtpd's 553 5.1.3."""
    async with raw_session(relay_server.port) as session:
        session.writer.write(b'MAIL FROM:<"a\nX-Evil: 1"@fabrikam.test>\r\n')
        first, second = await session.reply(), await session.reply()
        assert first == BAD_SENDER
        assert second.startswith("500 5.5.2 "), second
        assert QUEUED_RE.match(await session.transaction())
    assert await message_count(relay_server) == 1


# ---- RCPT TO ------------------------------------------------------------------------------------

HOSTILE_RECIPIENTS = [
    # onprem.contoso.test is an internal relay domain: it takes any local part.
    pytest.param(b'<"a\rX-Evil: 1"@onprem.contoso.test>', id="CR in quotes"),
    pytest.param(b"<a\x00b@onprem.contoso.test>", id="NUL"),
    pytest.param(b"<a\x01b@onprem.contoso.test>", id="SOH"),
    pytest.param(b'<"a\x1bb"@onprem.contoso.test>', id="ESC in quotes"),
    pytest.param(b"<a\x7fb@onprem.contoso.test>", id="DEL"),
    pytest.param(b"<a\xffb@onprem.contoso.test>", id="invalid UTF-8"),
    pytest.param(b"<\xe7\x94\xa8@onprem\xff.contoso.test>", id="invalid UTF-8 in the domain"),
]


@pytest.mark.parametrize("path", HOSTILE_RECIPIENTS)
async def test_a_hostile_recipient_is_refused_and_the_session_goes_on(
    relay_server: Relay, path: bytes
) -> None:
    async with raw_session(relay_server.port) as session:
        assert (await session.send(b"MAIL FROM:<sender@fabrikam.test>")).startswith("250 ")
        assert await session.send(b"RCPT TO:" + path) == BAD_RECIPIENT
        assert await session.send(b"RCPT TO:<alice@contoso.test>") == RCPT_OK
        assert (await session.send(b"DATA")).startswith("354 ")
        session.writer.write(make_message() + b".\r\n")
        final = await session.reply()
    assert relay_server.store is not None
    stored = await relay_server.store.get_message(queued_id(final))
    assert stored is not None
    assert [r.address for r in stored.recipients] == ["alice@contoso.test"]


async def test_hostile_rcpt_parameters_are_refused(relay_server: Relay) -> None:
    async with raw_session(relay_server.port) as session:
        assert (await session.send(b"MAIL FROM:<sender@fabrikam.test>")).startswith("250 ")
        reply = await session.send(b"RCPT TO:<alice@contoso.test> \x1c")
        assert reply == BAD_ARGUMENTS


async def test_vrfy_with_invalid_utf8_gets_a_reply_not_a_traceback(
    relay_server: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    async with raw_session(relay_server.port) as session:
        assert await session.send(b"VRFY <a\xffb@contoso.test") == BAD_RECIPIENT
        assert (await session.send(b"NOOP")).startswith("250 ")
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# ---- what reaches the log, the replies and the Maildir ------------------------------------------


async def test_no_traceback_and_no_raw_client_text_in_the_log(
    relay_server: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with raw_session(relay_server.port) as session:
        await session.send(b"EHLO a\rX-Injected: yes")
        await session.send(b"MAIL FROM:<a\x01b@fabrikam.test>")
        await session.send(b"MAIL FROM:<sender@fabrikam.test>")
        await session.send(b"RCPT TO:<a\xffb@onprem.contoso.test>")
        await session.send(b'RCPT TO:<"a\x1bb"@onprem.contoso.test>')
        await session.send(b"FOO\x01\x1b[2J")  # an unknown command with a terminal escape
        await session.send(b"RSET")
        assert QUEUED_RE.match(await session.transaction())
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    for record in caplog.records:
        text = record.getMessage()
        assert not UNSAFE.search(text), f"unescaped client text in the log: {text!r}"


async def test_replies_never_echo_control_characters(relay_server: Relay) -> None:
    async with raw_session(relay_server.port) as session:
        reply = await session.send(b"FOO\x01\x1b[2J")
        assert reply.startswith("500 5.5.2 "), reply
        assert not UNSAFE.search(reply), repr(reply)


def test_maildir_trace_fields_cannot_carry_a_header(tmp_path: Path) -> None:
    """Defence in depth for mail queued before intake refused such senders: Return-Path and
    Delivered-To are written with control characters shown as "?" (Postfix's printable())."""
    maildir.write_message(
        tmp_path,
        "alice@contoso.test",
        mail_from='"a\rX-Evil: 1"@fabrikam.test',
        content=make_message(),
    )
    (message,) = maildir_messages(tmp_path, "alice@contoso.test")
    assert message["X-Evil"] is None
    assert message["Return-Path"] == '<"a?X-Evil: 1"@fabrikam.test>'


# ---- routing syntax from clients that may not relay -------------------------------------------

ROUTED = [
    pytest.param("<user%fabrikam.test@onprem.contoso.test>", id="percent hack"),
    pytest.param("<fabrikam.test!user@onprem.contoso.test>", id="bang path"),
    pytest.param('<"user@fabrikam.test"@onprem.contoso.test>', id="quoted at"),
    pytest.param("<@a.fabrikam.test,@b.fabrikam.test:user@onprem.contoso.test>", id="source route"),
    pytest.param("<alice%fabrikam.test@contoso.test>", id="percent hack, authoritative"),
]


# One relay, two clients: 127.0.0.2 may relay, 127.0.0.1 may not.
TRUSTED = "127.0.0.2"


@pytest.mark.parametrize("path", ROUTED)
async def test_routing_syntax_is_relay_denied_only_for_a_client_that_may_not_relay(
    start_relay: StartRelay, path: str
) -> None:
    """Postfix's allow_untrusted_routing = no (its default): untrusted clients may not use
    sender-specified routing (user%elsewhere@domain, elsewhere!user@domain,
    user@elsewhere@domain); the reply is Exchange Online's to a relay attempt. A client
    that may relay is unaffected (a source route is then ignored, RFC 5321 appendix C)."""
    relay = await start_relay(smtp={"relay_networks": [f"{TRUSTED}/32"]})
    async with raw_session(relay.port) as session:
        assert (await session.send(b"MAIL FROM:<sender@fabrikam.test>")).startswith("250 ")
        assert await session.send(f"RCPT TO:{path}".encode()) == RELAY_DENIED
        assert await session.send(b"RCPT TO:<user@onprem.contoso.test>") == RCPT_OK
    async with raw_session(relay.port, source=TRUSTED) as session:
        assert (await session.send(b"MAIL FROM:<sender@fabrikam.test>")).startswith("250 ")
        if "contoso.test>" in path and "onprem" not in path:
            expected = "550 5.4.1 Recipient address rejected: Access denied"  # not a mailbox
        else:
            expected = RCPT_OK
        assert await session.send(f"RCPT TO:{path}".encode()) == expected


async def test_the_stored_subject_holds_no_control_characters(relay_server: Relay) -> None:
    """Not the envelope, but client text the queue keeps and `relay queue list` prints: an
    RFC 2047 encoded word may decode to a CR or a terminal escape."""
    subject = "=?utf-8?q?Invoice=0DX-Evil:_1=1B[2J_due?="
    async with raw_session(relay_server.port) as session:
        assert (await session.send(b"MAIL FROM:<sender@fabrikam.test>")).startswith("250 ")
        assert await session.send(b"RCPT TO:<alice@contoso.test>") == RCPT_OK
        assert (await session.send(b"DATA")).startswith("354 ")
        session.writer.write(make_message(subject=subject) + b".\r\n")
        final = await session.reply()
    assert relay_server.store is not None
    stored = await relay_server.store.get_message(queued_id(final))
    assert stored is not None
    assert stored.subject == "Invoice X-Evil: 1?[2J due"


async def test_one_sessions_ehlo_does_not_raise_another_sessions_line_limit(
    relay_server: Relay,
) -> None:
    """aiosmtpd keeps its per-command line limits on the class; a session's EHLOs must not
    let another session (or a later command of its own) send longer lines than RFC 5321
    section 4.5.3.1.4 allows (512 octets, plus SIZE= and SMTPUTF8 once advertised)."""
    long_mail = "MAIL FROM:<" + "a" * 680 + "@contoso.test>"  # about 700 octets
    async with smtp_client(relay_server.port) as other, smtp_client(relay_server.port) as client:
        for _ in range(20):
            assert (await other.ehlo(hostname="other.fabrikam.test")).code == 250
        reply = await command(client, long_mail)
        assert reply.code == 500 and "too long" in reply.message, reply_text(reply)
        for _ in range(20):
            assert (await client.ehlo(hostname="client.fabrikam.test")).code == 250
        reply = await command(client, long_mail)
        assert reply.code == 500 and "too long" in reply.message, reply_text(reply)
        reply = await command(client, "MAIL FROM:<alice@fabrikam.test>")
        assert reply.code == 250, reply_text(reply)
