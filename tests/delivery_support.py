"""Support for the delivery tests: lab configs, in-process relays on a ManualClock, own peers.

The lab (relay.lab.faults) provides one misbehaving server per fault; the delivery tests add
what it lacks: `manual_relay`, a relay started with `run_worker=False` (the test drives it
with `run_once()` and moves its clock with `advance()` instead of sleeping; the lab
operations tests use it too), and `ScriptedPeer`, a small SMTP server whose
behaviour a test chooses (per-recipient replies, a STARTTLS that breaks the handshake,
connection counting). Everything listens on 127.0.0.1 with ports from the OS.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import email.policy
import mailbox
import socket
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay import agents
from relay.clock import ManualClock
from relay.lab.faults import FaultLab, start_lab
from relay.routing import route
from relay.server import Relay
from relay.spool.rows import MessageRow, NewMessage, NewRecipient, RecipientRow
from relay.spool.sqlite import SqliteSpool
from tests.helpers import HOST, example_data, load, make_message, queued_id, send_mail, write_config

SENDER = "alice@contoso.test"  # a local mailbox: its NDRs land in its Maildir
EXTERNAL_SENDER = "sender@fabrikam.test"
AHEAD = 3600.0  # a manual_relay's clock runs this far ahead of real time (the CLI's)
ON_PREMISES = "To on-premises"  # the example config's connector for onprem.contoso.test


# ---- configs ------------------------------------------------------------------------------


def accepted(results: agents.Results) -> agents.Results:
    """An agent's results with each `agents.Delivered` as None (delivered, no details):
    for tests about who was accepted; the details are tests/test_logs.py's."""
    return {rid: None if isinstance(r, agents.Delivered) else r for rid, r in results.items()}


def lab_connectors(lab: FaultLab, *, connect_timeout: str = "1s") -> list[dict[str, Any]]:
    """The lab's own `[[connectors]]` blocks (one per mode), with a short connect timeout."""
    blocks = tomllib.loads(lab.connector_blocks())["connectors"]
    return [{**block, "connect_timeout": connect_timeout} for block in blocks]


def example_connectors() -> list[dict[str, Any]]:
    return list(example_data()["connectors"])


def connector(
    name: str, domain: str, port: int, *, tls: str = "none", **extra: Any
) -> dict[str, Any]:
    """A connector for `domain` whose only smart host is 127.0.0.1:port."""
    return {
        "name": name,
        "type": "partner",
        "recipient_domains": [domain],
        "smart_hosts": [f"{HOST}:{port}"],
        "tls": tls,
        "connect_timeout": "1s",
        **extra,
    }


def lab_config(
    directory: Path,
    lab: FaultLab,
    *,
    connectors: list[dict[str, Any]] | None = None,
    example: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> Path:
    """The example config with the lab DNS, then connectors: the example's (or `example`),
    the lab's, and `connectors`."""
    overrides.setdefault("dns", {"nameservers": [lab.dns.nameserver], "timeout": "1s"})
    first = example_connectors() if example is None else example
    return write_config(
        directory,
        connectors=[*first, *lab_connectors(lab), *(connectors or [])],
        **overrides,
    )


# ---- the lab and an in-process relay ----------------------------------------------------------


@contextlib.asynccontextmanager
async def running_lab(workdir: Path) -> AsyncIterator[FaultLab]:
    lab = await start_lab(host=HOST, workdir=workdir)
    try:
        yield lab
    finally:
        await lab.stop()


@contextlib.asynccontextmanager
async def manual_relay(config_path: Path) -> AsyncIterator[Relay]:
    """A started relay whose worker runs only when the test calls `run_once()`, on a
    ManualClock that starts AHEAD of real time and moves only with `advance()`.

    The CLI, a separate process, asks the database for the time (real time plus the lab
    offset), so whatever it makes "due now" is already due for this relay's worker. The
    periodic alert check is stopped, so a test's own `check_alerts()` is the only one.
    """
    relay = Relay(load(config_path), clock=ManualClock(start=time.time() + AHEAD))
    await relay.start(run_worker=False)
    alerter = relay._alerter  # no public switch for the 2-second alert loop
    if alerter is not None:
        alerter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await alerter
    try:
        yield relay
    finally:
        await relay.stop()


def store_of(relay: Relay) -> SqliteSpool:
    """The relay's spool, as the SQLite backend it is in tests (its file, `query`)."""
    assert isinstance(relay.store, SqliteSpool)
    return relay.store


async def run_once(relay: Relay) -> None:
    """One step of the worker: what is due now is dispatched and its results written."""
    assert relay.worker is not None
    await relay.worker.run_once()


def advance(relay: Relay, seconds: float) -> None:
    """Move a `manual_relay`'s clock (the worker hears of it, as of `relay clock advance`)."""
    assert isinstance(relay.clock, ManualClock)
    relay.clock.advance(seconds)


async def submit(
    relay: Relay,
    *,
    to: str | list[str],
    mail_from: str = SENDER,
    content: bytes | None = None,
    subject: str = "test",
) -> int:
    """Send one message to the relay over SMTP; returns its queue id."""
    rcpts = [to] if isinstance(to, str) else to
    body = content or make_message(
        subject=subject, sender=mail_from or EXTERNAL_SENDER, to=rcpts[0]
    )
    reply = await send_mail(relay.port, rcpt_tos=rcpts, mail_from=mail_from, content=body)
    return queued_id(reply)


async def enqueue(
    relay: Relay, *, to: str | Sequence[str], mail_from: str, subject: str = "test"
) -> int:
    """Queue a message straight into the store, as intake would, without SMTP (so also
    with addresses the intake would refuse)."""
    store = store_of(relay)
    now = relay.clock.now()
    queue_id = store.reserve_id()
    rcpts = [to] if isinstance(to, str) else list(to)
    content = make_message(subject=subject, sender=mail_from or EXTERNAL_SENDER, to=rcpts[0])
    await store.enqueue(
        NewMessage(
            id=queue_id,
            message_id=f"<{queue_id}@test>",
            mail_from=mail_from,
            subject=subject,
            received_at=now,
            expires_at=now + relay.config.queue.message_expiration,
            client_address=HOST,
            client_helo="test",
            recipients=[NewRecipient(a, route(a, relay.policy).label) for a in rcpts],
            content=content,
        )
    )
    return queue_id


async def message(relay: Relay, message_id: int) -> MessageRow:
    found = await store_of(relay).get_message(message_id, history=True)
    assert found is not None, f"message {message_id} is not in the queue"
    return found


async def recipient(relay: Relay, message_id: int, address: str | None = None) -> RecipientRow:
    """One recipient of a message (the only one when `address` is None), with its history."""
    rows = (await message(relay, message_id)).recipients
    if address is None:
        assert len(rows) == 1, rows
        return rows[0]
    (row,) = [r for r in rows if r.address == address]
    return row


async def ndrs(relay: Relay) -> list[MessageRow]:
    """The queued NDRs (null sender messages the relay generated)."""
    return [
        m
        for m in await store_of(relay).list_messages()
        if m.mail_from == "" and m.client_address == ""
    ]


def maildir(relay: Relay, address: str) -> mailbox.Maildir:
    root = relay.loaded.path(relay.config.mailboxes.path)
    return mailbox.Maildir(root / address, create=False)


def maildir_messages(relay_or_root: Relay | Path, address: str) -> list[email.message.EmailMessage]:
    """The messages in a local mailbox, parsed with the email package (none if it is missing)."""
    if isinstance(relay_or_root, Relay):
        root = relay_or_root.loaded.path(relay_or_root.config.mailboxes.path)
    else:
        root = relay_or_root
    path = root / address
    if not (path / "new").is_dir():
        return []
    box = mailbox.Maildir(path, create=False)
    parsed: list[email.message.EmailMessage] = []
    for key in sorted(box.keys()):  # Maildir names start with the delivery time
        raw = box.get_bytes(key)
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        parsed.append(message)
    return parsed


# ---- a closed port ------------------------------------------------------------------------


class ClosedPort:
    """A port bound but not listening: connects are refused until `release()`.

    Holding the bound socket keeps the port ours, so a test can later start a server on
    exactly that port (the destination "comes back").
    """

    def __init__(self) -> None:
        self._socket: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((HOST, 0))
        self.port = int(self._socket.getsockname()[1])

    def release(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


@contextlib.contextmanager
def closed_port() -> Iterator[ClosedPort]:
    port = ClosedPort()
    try:
        yield port
    finally:
        port.release()


# ---- a scripted SMTP peer -----------------------------------------------------------------


@dataclass(frozen=True)
class Delivered:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


@dataclass
class ScriptedPeer:
    """An SMTP server that speaks just enough ESMTP and does what the test asks.

    - `rcpt_reply(address)` returns the RCPT reply (default: accept everyone);
    - `starttls="none"` does not offer STARTTLS; `"broken"` offers it, answers 220 and then
      sends bytes that are not a TLS record and hangs up (a broken TLS stack or middlebox);
    - `data_reply` is the final reply to DATA (default: accepted);
    - `pipelining` advertises PIPELINING (RFC 2920), as Postfix and Exchange do;
    - `silent_at` ("MAIL", "RCPT", "DATA" or "." for the end of the content) stops answering
      there, the session's first time, and keeps the connection open: a hung server;
    - `connections` counts TCP sessions and `commands` keeps each session's command lines.
    """

    port: int = 0
    starttls: str = "none"
    pipelining: bool = False
    rcpt_reply: Callable[[str], str] = lambda address: "250 2.1.5 OK"
    data_reply: str = "250 2.6.0 Queued"
    silent_at: str = ""
    connections: int = 0
    commands: list[list[str]] = field(default_factory=list)
    received: list[Delivered] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, HOST, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ScriptedPeer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def sent_commands(self) -> list[str]:
        return [verb for session in self.commands for verb in session]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        log: list[str] = []
        self.commands.append(log)
        try:
            await self._converse(reader, writer, log)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: list[str]
    ) -> None:
        def send(*lines: str) -> None:
            writer.write("".join(f"{line}\r\n" for line in lines).encode())

        send("220 peer.test ESMTP scripted peer")
        mail_from, rcpts = "", list[str]()
        hang = self.silent_at if self.connections == 1 else ""
        while line := await reader.readline():
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = text.split(" ", 1)[0].upper()
            log.append(verb)
            if verb == hang:
                await asyncio.Event().wait()  # until the test stops the peer
            if verb == "EHLO":
                extensions = ["8BITMIME", *(["PIPELINING"] if self.pipelining else [])]
                if self.starttls != "none":
                    extensions.append("STARTTLS")
                lines = ["peer.test", *extensions]
                send(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")
            elif verb == "STARTTLS":
                send("220 2.0.0 Ready to start TLS")
                await writer.drain()
                writer.write(b"this is not a TLS record\r\n")
                await writer.drain()
                return
            elif verb == "MAIL":
                mail_from, rcpts = text.split(":", 1)[1].split(">")[0].lstrip(" <"), []
                send("250 2.1.0 OK")
            elif verb == "RCPT":
                address = text.split(":", 1)[1].split(">")[0].lstrip(" <")
                reply = self.rcpt_reply(address)
                if reply.startswith("2"):
                    rcpts.append(address)
                send(reply)
            elif verb == "DATA":
                send("354 go ahead")
                await writer.drain()
                data = await _read_data(reader)
                if hang == ".":
                    log.append(".")
                    await asyncio.Event().wait()
                if self.data_reply.startswith("2"):
                    self.received.append(Delivered(mail_from, tuple(rcpts), data))
                send(self.data_reply)
            elif verb == "QUIT":
                send("221 2.0.0 Bye")
                await writer.drain()
                return
            else:  # HELO, RSET, NOOP
                send("250 2.0.0 OK")
            await writer.drain()


async def _read_data(reader: asyncio.StreamReader) -> bytes:
    """DATA content up to the lone dot, with dot-stuffing undone (RFC 5321 4.5.2)."""
    lines: list[bytes] = []
    while line := await reader.readline():
        if line == b".\r\n":
            break
        lines.append(line[1:] if line.startswith(b".") else line)
    return b"".join(lines)
