"""The intake's session limits (issue 10, items 3, 7 and 8), over real sockets.

- DATA timeouts (RFC 5321 section 4.5.3.2): the idle timer moves with every read during
  DATA, so a slow but steady client finishes; one that stops sending is cut off.
- Connection limits: per client address (Postfix's smtpd_client_connection_count_limit)
  and overall, answered in the greeting with 421 and a close.
- Shutdown: IntakeServer.close(grace) stops listening, closes idle sessions with 421, lets
  a session in DATA get its 250 within the grace time and cuts what is left after it.
- RelaySMTP (relay/smtpd.py) mirrors aiosmtpd internals; the pins below fail loudly when
  aiosmtpd changes.

The waits here are real network time (a 1 s idle timeout, a client sending slowly), never
a retry interval of the relay's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import time

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP

from relay.intake import IntakeServer
from relay.server import Relay
from relay.smtpd import RelaySMTP
from tests.helpers import HOST, QUEUED_RE, StartRelay, TlsFiles, make_message
from tests.test_intake_hostile import RCPT_OK, RawSession, message_count, raw_session

pytestmark = pytest.mark.timeout(60)

HOSTNAME = "relay.contoso.test"
SHUTTING_DOWN = f"421 4.3.2 {HOSTNAME} Service shutting down"


def intake_of(relay: Relay) -> IntakeServer:
    server = relay._server
    assert server is not None
    return server


async def _start_data(session: RawSession, *, to: str = "alice@contoso.test") -> None:
    assert (await session.send(b"MAIL FROM:<sender@fabrikam.test>")).startswith("250 ")
    assert await session.send(f"RCPT TO:<{to}>".encode()) == RCPT_OK
    assert (await session.send(b"DATA")).startswith("354 ")


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(HOST, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


# ---- DATA timeouts ------------------------------------------------------------------------


async def test_a_slow_but_steady_client_finishes_data(start_relay: StartRelay) -> None:
    """About 2.4 s of DATA against a 1 s idle timeout: lines 0.2 s apart, then one long line
    in small pieces (the deadline moves per read, not per line), then the end."""
    relay = await start_relay(smtp={"idle_timeout": "1s"})
    content = make_message(body="x" * 900 + "\r\n")
    head, long_line = content[:-902], content[-902:]
    async with raw_session(relay.port) as session:
        await _start_data(session)
        started = time.monotonic()
        for line in head.splitlines(keepends=True):
            session.writer.write(line)
            await asyncio.sleep(0.2)
        for i in range(0, len(long_line), 60):
            session.writer.write(long_line[i : i + 60])
            await asyncio.sleep(0.1)
        session.writer.write(b".\r\n")
        final = await session.reply()
        assert time.monotonic() - started > 2, "the test did not trickle long enough"
        assert QUEUED_RE.match(final), final
    assert await message_count(relay) == 1


async def test_a_client_that_stops_mid_data_is_cut_off_and_nothing_is_stored(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(smtp={"idle_timeout": "1s"})
    async with raw_session(relay.port) as session:
        await _start_data(session)
        session.writer.write(b"Subject: half\r\n\r\nthe first half, then silence\r\n")
        silent = time.monotonic()
        assert await session.reply(timeout=10) == ""  # closed, as aiosmtpd does on a timeout
        assert await session.closed()
        assert 0.8 < time.monotonic() - silent < 5
    assert await message_count(relay) == 0


async def test_idle_timeout_between_commands_comes_from_the_config(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(smtp={"idle_timeout": "1s"})
    async with raw_session(relay.port) as session:
        silent = time.monotonic()
        assert await session.reply(timeout=10) == ""
        assert 0.8 < time.monotonic() - silent < 5


# ---- connection limits ----------------------------------------------------------------------


async def _open(port: int, source: str = HOST) -> RawSession:
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    session = RawSession(reader, writer)
    session.greeting = await session.reply()
    return session


async def _close_all(sessions: list[RawSession]) -> None:
    for session in sessions:
        session.writer.close()
        with contextlib.suppress(ConnectionError):
            await session.writer.wait_closed()


async def test_one_connection_over_the_per_client_limit_gets_421_and_is_closed(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(smtp={"max_connections_per_client": 2})
    held = [await _open(relay.port), await _open(relay.port)]
    try:
        assert [s.greeting[:4] for s in held] == ["220 ", "220 "]
        third = await _open(relay.port)
        assert third.greeting == f"421 4.7.0 {HOSTNAME} Error: too many connections from {HOST}"
        assert await third.closed()
        # Another client address has its own count.
        other = await _open(relay.port, source="127.0.0.2")
        assert other.greeting.startswith("220 "), other.greeting
        await _close_all([other])
        # The refused connection was not counted; closing one held session frees one slot.
        await _close_all([held.pop()])
        again = await _admitted_again(relay.port)
        assert again.greeting.startswith("220 "), again.greeting
        held.append(again)
        fourth = await _open(relay.port)
        assert fourth.greeting.startswith("421 4.7.0 "), fourth.greeting
        await _close_all([fourth])
    finally:
        await _close_all(held)


async def _admitted_again(port: int) -> RawSession:
    """A new connection once the relay has seen an earlier one close (real network time)."""
    deadline = time.monotonic() + 5
    while True:
        session = await _open(port)
        if session.greeting.startswith("220 ") or time.monotonic() > deadline:
            return session
        await _close_all([session])


async def test_a_session_that_starts_tls_is_counted_once(
    start_relay: StartRelay, tls_files: TlsFiles
) -> None:
    """aiosmtpd calls connection_made again for the TLS transport: still one session."""
    relay = await start_relay(smtp=tls_files.smtp_overrides(max_connections_per_client=1))
    first = await _open(relay.port)
    assert (await first.send(b"EHLO client.fabrikam.test")).startswith("250-")
    assert (await first.send(b"STARTTLS")).startswith("220 ")
    await first.writer.start_tls(tls_files.client_context(), server_hostname=HOSTNAME)
    assert (await first.send(b"EHLO client.fabrikam.test")).startswith("250-")
    second = await _open(relay.port)
    assert second.greeting.startswith("421 4.7.0 "), second.greeting
    await _close_all([first, second])
    again = await _admitted_again(relay.port)
    try:
        assert again.greeting.startswith("220 "), again.greeting
        extra = await _open(relay.port)  # released once, not twice: still a limit of one
        assert extra.greeting.startswith("421 4.7.0 "), extra.greeting
        await _close_all([extra])
    finally:
        await _close_all([again])


async def test_one_connection_over_the_overall_limit_gets_421(start_relay: StartRelay) -> None:
    relay = await start_relay(smtp={"max_connections": 3})
    held = [await _open(relay.port, source=f"127.0.0.{n}") for n in (1, 2, 3)]
    try:
        assert [s.greeting[:4] for s in held] == ["220 "] * 3
        extra = await _open(relay.port, source="127.0.0.4")
        assert extra.greeting == (
            f"421 4.3.2 {HOSTNAME} Error: too many connections; try again later"
        )
        assert await extra.closed()
        # The sessions already open work as before.
        assert (await held[0].send(b"EHLO client.fabrikam.test")).startswith("250-")
    finally:
        await _close_all(held)


# ---- shutdown -------------------------------------------------------------------------------


async def test_close_sends_421_to_sessions_between_transactions_and_stops_listening(
    relay_server: Relay,
) -> None:
    port = relay_server.port
    async with raw_session(port) as idle, raw_session(port) as busy:
        assert (await busy.send(b"MAIL FROM:<sender@fabrikam.test>")).startswith("250 ")
        assert await busy.send(b"RCPT TO:<alice@contoso.test>") == RCPT_OK
        started = time.monotonic()
        await intake_of(relay_server).close(grace=5)
        assert time.monotonic() - started < 2, "nothing was in DATA: no reason to wait"
        for session in (idle, busy):
            assert await session.reply() == SHUTTING_DOWN
            assert await session.closed()
        assert await _refused(port)
    assert await message_count(relay_server) == 0


async def test_close_lets_a_session_in_data_finish_and_get_its_250(relay_server: Relay) -> None:
    port = relay_server.port
    async with raw_session(port) as session:
        await _start_data(session)
        session.writer.write(b"Subject: in flight\r\n\r\nfirst part\r\n")
        await asyncio.sleep(0.2)  # the server has read the first part (real network time)
        closing = asyncio.create_task(intake_of(relay_server).close(grace=5))
        await asyncio.sleep(0.2)
        assert not closing.done(), "close() did not wait for the session in DATA"
        assert await _refused(port), "still listening during the grace time"
        session.writer.write(b"second part\r\n.\r\n")
        assert QUEUED_RE.match(await session.reply())
        assert await session.reply() == SHUTTING_DOWN
        assert await session.closed()
        await asyncio.wait_for(closing, 5)
    assert await message_count(relay_server) == 1


async def test_close_cuts_a_session_still_in_data_after_the_grace_time(
    relay_server: Relay,
) -> None:
    async with raw_session(relay_server.port) as session:
        await _start_data(session)
        session.writer.write(b"Subject: never finished\r\n\r\nfirst part\r\n")
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await intake_of(relay_server).close(grace=0.5)
        assert 0.4 < time.monotonic() - started < 3
        assert await session.reply() == ""  # cut: no 250, no 421
    assert await message_count(relay_server) == 0


# ---- the aiosmtpd internals RelaySMTP relies on ---------------------------------------------

# sha256 of inspect.getsource() in aiosmtpd 1.4.6: every SMTP method RelaySMTP (relay/smtpd.py)
# overrides, and those it calls or relies on without overriding them. The constructor's
# tables are also compared with aiosmtpd's own in tests/test_intake_fast.py. When one of
# these changes, re-read it, port the change to relay/smtpd.py, and update the hash here.
OVERRIDDEN = {
    # the constructor's dir()/inspect scan, done once per class
    "__init__": "8a9ca80f23ad9bf273e58e284170e9f919dc6269b280ca0624ac0603a8ad3604",
    # the connection limits and STARTTLS: connection_made calls itself again for the TLS
    # transport with _original_transport set
    "connection_made": "77a45df5065bba343a040b6f6c88de8907b40c80bc03727e7f18ede20d19f4bf",
    "connection_lost": "d3bf6349bc3c25c1da222896000a041fae278d177036ffaea0cabc4cb9bc655b",
    # the hostile-envelope checks rely on how it decodes a command line (ASCII verb, UTF-8
    # arguments with surrogateescape, the line read up to LF and stripped of CR and LF)
    "_handle_client": "0e4d096403af6c74c87b2fe722c213884e2140a9388e95feb05aec2f39e05556",
    "_reset_timeout": "fef19b94d28dff319ca0ca9ecc1884e8f419d9f016d1d25380b01d5e85ff3c78",
    "smtp_HELO": "c61e63948c38ce2840b72bee1e9be14ba520438302421b318f44174c24eb8141",
    # grows command_size_limits["MAIL"] per EHLO
    "smtp_EHLO": "1d91592dd954c4cd87bf365fc57f0a16e36d9ff911cda1b2b253a4981618f19f",
    "smtp_MAIL": "80dd938e7791acfb31bc6eef174b9c1af96d7bac54fe103198ec6ce3440e8043",
    "smtp_RCPT": "a0d6605883c0e608df4fe4376f284be97e36a9b257d6401dd0116ec972c3e0ea",
    "smtp_VRFY": "3fc88a3b6c62da094471ea8e5d88e9a331be7a7d19deb5e5495c9d2afb7dd1aa",
    "_getaddr": "0aeb21c56ac1260e784e430a340459c83c23640a85965e7b8de3e1ada74d85f5",
    "push": "15f4f1de5e30c337e3df529f7b5794d3dd071f6c32ddf53bf21248c6e2277c48",
    "smtp_DATA": "3a33f30d3fd6d02f39c7d78a08288bffea9170525b62e2161568041ae7e018df",
}
RELIED_ON = {
    "_timeout_cb": "10a7351f9bec281831442cd03ddb4f403d0d3f18b939976ea4f83b9ff557c10d",
    # what RelaySMTP.smtp_DATA calls, as aiosmtpd's does
    "check_helo_needed": "9829bb73251c983eef39d54df95b7d7a177c054e315fecfa0602fa74f9eee8c4",
    "check_auth_needed": "812bbc794078b1b0a6171a54910fab7fec3f3dff963fb3be933612ba775cd1ee",
    "_call_handler_hook": "6ff23a6634ea03076444ef30df9fd65b01c4d52e9fda0bd3d99339aacc488d74",
    "_set_post_data_state": "1dc8a8abca2a81644a605b8ebf427fc7472eeadf5149dd3cf2591fa86b2256e9",
}
PINNED = {**OVERRIDDEN, **RELIED_ON}


def test_relay_smtp_mirrors_the_aiosmtpd_it_was_written_against() -> None:
    assert aiosmtpd.__version__.startswith("1.4."), aiosmtpd.__version__
    changed = [
        name
        for name, pinned in PINNED.items()
        if hashlib.sha256(inspect.getsource(getattr(SMTP, name)).encode()).hexdigest() != pinned
    ]
    assert not changed, (
        f"aiosmtpd {aiosmtpd.__version__} changed SMTP.{', SMTP.'.join(changed)}; RelaySMTP "
        "in relay/smtpd.py was written against 1.4.6: compare the two, port the change, "
        "then update PINNED"
    )


def test_every_override_of_aiosmtpd_is_pinned() -> None:
    """A new override of an SMTP method is written against some aiosmtpd: pin it too."""
    overridden = {
        name
        for name, value in vars(RelaySMTP).items()
        if inspect.isfunction(value) and name in vars(SMTP)
    }
    assert overridden == OVERRIDDEN.keys()
