"""DATA content written in chunks (issue 10, item 6: memory): the same bytes as aiosmtplib's
own encoding, without its whole copies of a big message.

`data_chunks` is checked byte for byte against aiosmtplib's encoding (every short message
over {a . CR LF} at small chunk sizes, and the seams of 64 KiB chunks); then messages above
the 64 KiB threshold, up to 35 MB, go to a real peer on loopback through the agent and
through aiosmtplib, and must arrive identical. The aiosmtplib internals the stream uses are
checked so a new aiosmtplib fails here, loudly, rather than in production.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections.abc import Iterator

import aiosmtplib
import pytest
from aiosmtplib.protocol import (
    LINE_ENDINGS_REGEX,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)

from relay.agents import Parcel, Results, smtp
from relay.agents.smtp import DATA_CHUNK, SmtpAgent, data_chunks
from relay.classify import Failure, Stage, classify
from relay.config import Connector
from relay.resolve import Resolver
from relay.routing import Route, RouteKind
from tests.delivery_support import SENDER, ScriptedPeer, accepted, connector
from tests.helpers import HOST

pytestmark = pytest.mark.timeout(60)

RCPT = "big@partner.test"
FILL = (b"a" * 70 + b"\r\n") * 2800  # about 3 chunks of ordinary text lines


def aiosmtplib_encoding(content: bytes) -> bytes:
    """What aiosmtplib 5.1's execute_data_command writes after the 354, final "." included."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content)) + b".\r\n"


def streamed(content: bytes, size: int = DATA_CHUNK) -> bytes:
    return b"".join(data_chunks(content, size)) + b".\r\n"


def around(seam: bytes, offset: int, fill: bytes = FILL) -> bytes:
    """`fill` with `seam` written over it from byte DATA_CHUNK + offset (the first seam)."""
    at = DATA_CHUNK + offset
    return fill[:at] + seam + fill[at + len(seam) :]


# Each puts something awkward where the first 64 KiB chunk ends and the second begins.
SEAMS = {
    "dot-opens-a-line-at-the-seam": around(b"\r\n.x", -2),
    "dot-mid-line-at-the-seam": around(b"q.x", -1),
    "crlf-split-by-the-seam": around(b"\r\n", -1),
    "crlf-split-then-dot": around(b"\r\n.", -1),
    "cr-cr-lf-across-the-seam": around(b"\r\r\n", -2),
    "bare-cr-ends-the-chunk": around(b"\rz", -1),
    "bare-lf-opens-the-chunk-then-dot": around(b"z\n.", -1),
    "bare-lf-ends-the-chunk-then-dot": around(b"\n.", -1),
    "bare-lf-throughout-with-dots": b".a\nb\n..c\n" * 30000,
    "bare-cr-throughout-with-dots": b".a\rb\r..c\r" * 30000,
    "no-final-crlf": FILL + b"the last line",
    "ends-with-a-bare-cr": FILL + b"x\r",
    "ends-with-a-dot": FILL + b".",
    "starts-with-a-dot": b"." + FILL,
    "exactly-one-chunk": FILL[:DATA_CHUNK],
    "one-byte-over": FILL[: DATA_CHUNK + 1],
    "dot-lines-of-every-phase": b"".join(b"." + b"d" * n + b"\r\n" for n in range(1, 700)),
}


# ---- the encoding, pure -----------------------------------------------------------------------


def _short_messages() -> Iterator[bytes]:
    for length in range(8):
        for parts in itertools.product((b"a", b".", b"\r", b"\n"), repeat=length):
            yield b"".join(parts)


def test_the_chunks_are_aiosmtplibs_encoding_for_every_short_message() -> None:
    """Every message of up to 7 bytes over {a . CR LF}, cut every 2 to 5 bytes: each seam
    lands on every kind of neighbour (CR|LF, CR|CR, LF|., .|., ...)."""
    for content in _short_messages():
        expected = aiosmtplib_encoding(content)
        for size in range(2, 6):
            assert streamed(content, size) == expected, (content, size)


@pytest.mark.parametrize("name", list(SEAMS))
def test_the_chunks_are_aiosmtplibs_encoding_at_the_64_kib_seams(name: str) -> None:
    content = SEAMS[name]
    assert streamed(content) == aiosmtplib_encoding(content)


def test_an_empty_message_is_one_empty_line() -> None:
    assert streamed(b"") == aiosmtplib_encoding(b"") == b"\r\n.\r\n"


# ---- aiosmtplib: the version and internals delivery relies on --------------------------------


def test_aiosmtplib_is_the_version_the_stream_was_written_for() -> None:
    major, minor = (int(part) for part in aiosmtplib.__version__.split(".")[:2])
    assert (major, minor) == (5, 1), (
        f"aiosmtplib {aiosmtplib.__version__}: relay/agents/smtp.py (Session._stream) uses "
        "aiosmtplib 5.1's SMTPProtocol internals; check them against the new version "
        "(this file's tests), then move the bound in pyproject.toml"
    )


def test_aiosmtplibs_encoding_is_the_one_data_chunks_reproduces() -> None:
    assert LINE_ENDINGS_REGEX.pattern == rb"(?:\r\n|\n|\r(?!\n))"
    assert PERIOD_REGEX.pattern == rb"(?m)^\."


async def test_the_protocol_internals_the_stream_uses_are_there() -> None:
    assert inspect.iscoroutinefunction(SMTPProtocol._drain_helper)
    assert list(inspect.signature(SMTPProtocol.write).parameters) == ["self", "data"]
    assert "timeout" in inspect.signature(SMTPProtocol.read_response).parameters
    async with ScriptedPeer() as peer:
        smtp = aiosmtplib.SMTP(hostname=HOST, port=peer.port, start_tls=False, timeout=5)
        await smtp.connect()
        try:
            protocol = smtp.protocol
            assert isinstance(protocol, SMTPProtocol)
            assert isinstance(protocol._command_lock, asyncio.Lock)
            assert protocol._response_pending is False  # between commands: replies dropped
            # What _stream does: expect a reply, write raw bytes, wait for room, read it.
            protocol._response_pending = True
            protocol.write(b"NOOP\r\n")
            await protocol._drain_helper()
            reply = await protocol.read_response(timeout=5)
            assert reply.code == 250
            assert protocol._response_pending is False
        finally:
            smtp.close()


# ---- over the wire --------------------------------------------------------------------------


def partner_route(port: int) -> Route:
    partner = Connector.model_validate(connector("Partner", "partner.test", port))
    return Route(RouteKind.CONNECTOR, "partner.test", partner)


async def send_through_agent(port: int, content: bytes) -> Results:
    agent = SmtpAgent(resolver=Resolver(nameservers=[], timeout=1.0), hostname="relay.contoso.test")

    async def load(message: int) -> bytes:
        return content

    parcel = Parcel(1, SENDER, ((1, RCPT),))
    got: Results = {}
    async for _, results in agent.deliver(partner_route(port), [parcel], load):
        got = accepted(results)
    await agent.close_idle(older_than=0)
    return got


async def send_through_aiosmtplib(port: int, content: bytes) -> None:
    smtp = aiosmtplib.SMTP(hostname=HOST, port=port, start_tls=False, timeout=10)
    await smtp.connect()
    try:
        await smtp.sendmail(SENDER, [RCPT], content)
        await smtp.quit()
    finally:
        smtp.close()


async def test_messages_over_the_threshold_arrive_as_aiosmtplib_sends_them() -> None:
    """Each seam case once through the agent (streamed) and once through aiosmtplib's own
    DATA: the peer must get the same bytes."""
    async with ScriptedPeer() as peer:
        for name, content in SEAMS.items():
            peer.received.clear()
            assert await send_through_agent(peer.port, content) == {1: None}, name
            await send_through_aiosmtplib(peer.port, content)
            ours, theirs = peer.received
            assert ours.data == theirs.data, name


async def test_a_35_mb_message_arrives_byte_identical_in_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Lines of every kind (dots at line starts, bare LF, bare CR) in a pattern whose length
    does not divide 64 KiB, so the seams fall everywhere; no write holds the whole message."""
    pattern = b".dot\r\n" + b"p" * 500 + b"\r\n" + b"bare lf\n" + b"..two\r\n" + b"bare cr\r"
    content = pattern * (35_000_000 // len(pattern)) + b"no final CRLF"
    writes: list[int] = []
    write = SMTPProtocol.write

    def counted(self: SMTPProtocol, data: bytes) -> None:
        writes.append(len(data))
        write(self, data)

    monkeypatch.setattr(SMTPProtocol, "write", counted)
    async with ScriptedPeer() as peer:
        assert await send_through_agent(peer.port, content) == {1: None}
        (got,) = peer.received
        # The peer undoes the dot-stuffing (RFC 5321 section 4.5.2): what is left is the
        # content with aiosmtplib's CRLF normalisation, byte for byte.
        assert got.data == normalize_message_line_endings(content)
    assert max(writes) <= 3 * DATA_CHUNK  # a chunk, grown by stuffing and CRLFs at most
    assert len(writes) > len(content) // DATA_CHUNK


# ---- a peer that misbehaves in the middle of the content --------------------------------------


class DataPeer:
    """Minimal SMTP on loopback whose DATA phase goes wrong: `mode` "refuse-early" answers
    552 after `after` bytes of content and reads on to the end without another reply;
    "stop-reading" stops reading after the 354 (a hung server with full buffers)."""

    def __init__(self, mode: str, *, after: int = 100_000) -> None:
        self.mode = mode
        self.after = after
        self.port = 0
        self.commands: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> DataPeer:
        self._server = await asyncio.start_server(self._session, HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            writer.write(b"220 data.peer.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line.split(b" ", 1)[0].strip().upper().decode()
                self.commands.append(verb)
                if verb == "DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    await self._content(reader, writer)
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                else:  # EHLO, MAIL, RCPT, RSET
                    writer.write(b"250 OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _content(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "stop-reading":
            await asyncio.Event().wait()
        await reader.readexactly(self.after)
        writer.write(b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
        await writer.drain()
        while (line := await reader.readline()) and line != b".\r\n":
            pass
        self.commands.append(".")


async def test_a_refusal_during_the_content_is_the_parcels_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server may answer before the final "." and read on (RFC 5321 does not forbid it):
    the reply is kept and reported, not dropped for arriving before we asked."""
    monkeypatch.setattr(smtp, "COMMAND_TIMEOUT", 2.0)
    monkeypatch.setattr(smtp, "DATA_TIMEOUT", 2.0)
    async with DataPeer("refuse-early") as peer:
        results = await send_through_agent(peer.port, FILL * 120)  # still sending at 552

        event = results[1]
        assert event is not None
        assert (event.stage, event.failure, event.code) == (Stage.DATA, Failure.REPLY, 552)
        assert classify(event).permanent
        assert peer.commands[-3:] == [".", "RSET", "QUIT"]


async def test_a_server_that_stops_reading_the_content_times_out_on_the_transactions_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chunks wait for the socket: with a server that reads nothing, what the relay has
    buffered stays about one chunk (aiosmtplib's single write buffered all 26 MB), and the
    transaction's deadline still ends it."""
    monkeypatch.setattr(smtp, "COMMAND_TIMEOUT", 1.0)
    monkeypatch.setattr(smtp, "DATA_TIMEOUT", 1.0)
    buffered: list[int] = []
    write = SMTPProtocol.write

    def watched(self: SMTPProtocol, data: bytes) -> None:
        write(self, data)
        assert isinstance(self.transport, asyncio.WriteTransport)
        buffered.append(self.transport.get_write_buffer_size())

    monkeypatch.setattr(SMTPProtocol, "write", watched)
    async with DataPeer("stop-reading") as peer:
        started = time.monotonic()
        results = await send_through_agent(peer.port, FILL * 120)  # 26 MB: buffers fill

        assert time.monotonic() - started < 10
        assert max(buffered) <= 4 * DATA_CHUNK
        event = results[1]
        assert event is not None
        assert (event.stage, event.failure) == (Stage.DATA, Failure.TIMEOUT)
        assert "did not answer DATA in time" in event.detail
