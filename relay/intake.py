"""The SMTP front end: the policy hooks that accept mail the way Exchange Online does, the
listening server, and its connection limits.

It validates recipients and limits, writes the message to the queue and answers 250 only
after the commit. It never delivers: the worker does (see shared/DESIGN.md). Nothing a
client sends reaches a header, a file name or the store unless it is free of control
characters and valid UTF-8 (relay.smtpd refuses it at its command), and log lines show
client text escaped. The protocol itself, aiosmtpd's with the relay's overrides, is
relay.smtpd; the header fields written here come from relay.headers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.clock import Clock
from relay.errors import StoreError
from relay.headers import complete_headers, received_header, rfc5322_date, with_protocol
from relay.logs import Line
from relay.policy import Policy
from relay.routing import route
from relay.smtpd import BAD_RECIPIENT, BAD_SENDER, TLS_FIRST, RelaySMTP, client_ip
from relay.spool.protocol import Spool
from relay.spool.rows import NewMessage, NewRecipient

log = logging.getLogger("relay.intake")

BANNER_IDENT = "Microsoft ESMTP MAIL Service ready (mailflow-relay lab)"
MAIL_OK = "250 2.1.0 Sender OK"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"  # RFC 5321 section 4.5.3.1.8
STORE_FAILED = "451 4.3.0 Temporary server error, please try again later"


class IntakeHandler:
    """aiosmtpd handler: Exchange Online's recipient rules, limits and acceptance reply."""

    def __init__(
        self,
        *,
        store: Spool,
        clock: Clock,
        policy: Callable[[], Policy],
        hostname: str,
        max_recipients: int,
        message_expiration: float,
        require_tls: bool,
    ) -> None:
        self._store = store
        self._clock = clock
        self._policy = policy
        self._hostname = hostname
        self._max_recipients = max_recipients
        self._expiration = message_expiration
        self._require_tls = require_tls

    @property
    def clock(self) -> Clock:
        """The relay's clock: the greeting's date comes from it too."""
        return self._clock

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # We offer no AUTH (Exchange Online's MX doesn't), and add what aiosmtpd supports
        # but does not announce.
        lines = [r for r in responses[:-1] if not r.startswith("250-AUTH")]
        lines[0] = f"250-{self._hostname} Hello [{client_ip(session)}]"
        lines += ["250-PIPELINING", "250 ENHANCEDSTATUSCODES"]
        return lines

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self._require_tls and session.ssl is None:
            return TLS_FIRST
        if address != "<>" and "@" not in address:
            return BAD_SENDER
        # aiosmtpd reads an empty sender as "no MAIL yet"; the null sender stays "<>" here
        # and becomes "" when the message is queued.
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return MAIL_OK

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        policy = self._policy()
        # RFC 5321 section 4.5.1: RCPT TO:<Postmaster> needs no domain.
        if "@" not in address and not policy.is_postmaster(address):
            return BAD_RECIPIENT
        if len(envelope.rcpt_tos) >= self._max_recipients:
            return TOO_MANY_RECIPIENTS
        routed = isinstance(server, RelaySMTP) and server.source_routed
        reply = policy.rcpt_reply(address, client_ip=client_ip(session), source_route=routed)
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # aiosmtpd sets the sender only when the MAIL hook returns nothing; ours always
        # answers, so the sender is whatever handle_MAIL stored ("" for the null sender).
        raw = envelope.original_content or b""
        queue_id = self._store.reserve_id()
        now = self._clock.now()
        headers, message_id, subject = complete_headers(raw, now=now, hostname=self._hostname)
        received = _trace_header(
            session=session, hostname=self._hostname, queue_id=queue_id, envelope=envelope, now=now
        )
        content = _prepend(received + headers, raw)
        policy = self._policy()
        message = NewMessage(
            id=queue_id,
            message_id=message_id,
            mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            subject=subject,
            received_at=now,
            expires_at=now + self._expiration,
            client_address=client_ip(session),
            client_helo=session.host_name or "",
            recipients=[NewRecipient(a, route(a, policy).label) for a in envelope.rcpt_tos],
            content=content,
        )
        try:
            await self._store.enqueue(message)
        except StoreError as exc:
            log.error("queueing failed, answered 451: %s", exc)
            return STORE_FAILED
        log.info(_queued_line(message, session, size=len(content)))
        bracketed = f"<{message_id.strip().strip('<>')}>"
        return f"250 2.6.0 {bracketed} [InternalId={queue_id}] Queued mail for delivery"


def _queued_line(message: NewMessage, session: Session, *, size: int) -> Line:
    """`id=7 from=<a@b> to=<c@d> nrcpt=1 size=2310 client=192.0.2.1 helo=... tls=TLSv1.3
    message_id=<...> status=queued`: rendered (and escaped) on the logging thread."""
    tls = None
    if session.ssl is not None:
        ssl_object = session.ssl.get("ssl_object")
        tls = ssl_object.version() if ssl_object is not None else "yes"
    return Line(
        id=message.id,
        **{"from": message.mail_from},
        to=tuple(r.address for r in message.recipients),
        nrcpt=len(message.recipients),
        size=size,
        client=message.client_address,
        helo=message.client_helo,
        tls=tls,
        message_id=message.message_id,
        status="queued",
    )


def _prepend(prefix: bytes, raw: bytes | bytearray) -> bytes:
    """prefix + raw as the bytes to store, with at most two whole copies alive at once.

    RelaySMTP.smtp_DATA hands over a bytearray: the prefix goes in at its front in place
    (one copy, moved within its buffer), `bytes()` makes the second, and the bytearray is
    emptied at once, so only the stored copy is left while the commit is awaited. SQLite
    then makes two more while it inserts (the bound value and the record): the peak.
    """
    if isinstance(raw, bytearray):
        raw[:0] = prefix
        content = bytes(raw)
        raw.clear()
        return content
    return prefix + raw


def _trace_header(
    *, session: Session, envelope: Envelope, hostname: str, queue_id: int, now: float
) -> bytes:
    """This hop's Received: field, from what the session and the envelope say."""
    ip = client_ip(session)
    return received_header(
        helo=session.host_name or ip,  # refused at EHLO when unsafe; printable anyway
        ip=ip,
        by=hostname,
        protocol=with_protocol(
            extended=bool(session.extended_smtp),
            tls=session.ssl is not None,
            utf8=bool(envelope.smtp_utf8),
        ),
        queue_id=queue_id,
        recipient=envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None,
        now=now,
    )


@dataclass(frozen=True)
class SessionLimits:
    """The intake's per-session limits ([smtp] idle_timeout, max_connections,
    max_connections_per_client; 0 for a connection limit means none)."""

    idle_timeout: float = 300.0  # RFC 5321 section 4.5.3.2.7: at least 5 minutes
    max_connections: int = 500
    max_connections_per_client: int = 50  # Postfix's smtpd_client_connection_count_limit


class _Gate:
    """Counts open sessions, overall and per client address (what Postfix's anvil(8) does
    for smtpd_client_connection_count_limit), and words the 421 for one too many."""

    def __init__(self, *, hostname: str, limits: SessionLimits) -> None:
        self._hostname = hostname
        self._limits = limits
        self._per_client: collections.Counter[str] = collections.Counter()
        self.open = 0

    def admit(self, ip: str) -> str | None:
        """None, and the session is counted; or the 421 greeting that refuses it."""
        limits = self._limits
        per_client = limits.max_connections_per_client
        if per_client and self._per_client[ip] >= per_client:
            # Postfix smtpd's reply, word for word.
            return f"421 4.7.0 {self._hostname} Error: too many connections from {ip}"
        if limits.max_connections and self.open >= limits.max_connections:
            # RFC 3463 X.3.2: the system is not accepting network messages (postscreen's
            # "421 4.3.2 All server ports are busy").
            return f"421 4.3.2 {self._hostname} Error: too many connections; try again later"
        self._per_client[ip] += 1
        self.open += 1
        return None

    def release(self, ip: str) -> None:
        self.open -= 1
        left = self._per_client[ip] - 1
        if left > 0:
            self._per_client[ip] = left
        else:
            del self._per_client[ip]


def tls_context(certificate: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    return context


class IntakeServer:
    """The listening socket, the sessions it has open and their count per client."""

    def __init__(self, *, hostname: str, gate: _Gate | None = None) -> None:
        self.server: asyncio.Server | None = None
        self.sessions: weakref.WeakSet[RelaySMTP] = weakref.WeakSet()
        self.hostname = hostname
        self.gate = gate

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening; close the sessions between transactions at once with a 421; let
        those in DATA, or waiting for their commit, have their final reply within `grace`
        seconds; then cut whatever is left. Cutting a session whose message is committed
        but not yet answered makes its client send it again: a duplicate, hence the wait."""
        if self.server is None:
            return
        self.server.close()
        goodbye = f"421 4.3.2 {self.hostname} Service shutting down"
        finishing = [f for s in list(self.sessions) if (f := s.shut_down(goodbye)) is not None]
        if finishing:
            await asyncio.wait(finishing, timeout=grace)
        for session in list(self.sessions):
            session.cut()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 2)


async def start_intake(
    *,
    handler: IntakeHandler,
    host: str,
    port: int,
    hostname: str,
    max_message_size: int,
    tls: ssl.SSLContext | None,
    require_tls: bool,
    limits: SessionLimits | None = None,
) -> IntakeServer:
    """Listen on host:port; each connection gets its own RelaySMTP protocol instance, and
    `limits` ([smtp] idle_timeout and the connection limits) hold for all of them."""
    loop = asyncio.get_running_loop()
    limits = limits or SessionLimits()
    gate = _Gate(hostname=hostname, limits=limits)
    intake = IntakeServer(hostname=hostname, gate=gate)

    def factory() -> RelaySMTP:
        session = RelaySMTP(
            handler,
            gate=gate,
            data_size_limit=max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident=f"{BANNER_IDENT} at {rfc5322_date(handler.clock.now())}",
            tls_context=tls,
            require_starttls=False,  # handle_MAIL answers 530 5.7.0 itself
            timeout=limits.idle_timeout,
            loop=loop,
        )
        intake.sessions.add(session)
        return session

    intake.server = await loop.create_server(factory, host=host, port=port)
    return intake
