"""The SMTP delivery agent: resolve, connect, apply the connector's TLS policy, run the SMTP
transaction, and report per recipient what happened on the wire. It decides nothing:
`relay.classify` turns its `WireEvent`s into outcomes, and the queue manager writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
from aiosmtplib import (
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPDataError,
    SMTPException,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from relay.agents import (
    CACHE_TIME_LIMIT,
    CONNECTIONS_PER_ROUTE,
    Content,
    Delivered,
    Parcel,
    Results,
)
from relay.classify import Failure, Stage, WireEvent
from relay.config import TlsPolicy
from relay.errors import DnsError, RelayError
from relay.net import endpoint
from relay.resolve import Resolver, is_ip
from relay.routing import Route, RouteKind
from relay.text import escaped

log = logging.getLogger("relay.delivery")

# RFC 5321 section 4.5.3.2 suggests minutes per command; a lab wants failures sooner.
COMMAND_TIMEOUT = 60.0
DATA_TIMEOUT = 120.0
REQUIRED_TLS = frozenset(
    {TlsPolicy.ENCRYPTION_ONLY, TlsPolicy.CERTIFICATE_VALIDATION, TlsPolicy.DOMAIN_VALIDATION}
)
# OpenSSL's X509 verify results (x509_vfy.h) that mean "expired" / "not trusted".
_EXPIRED = {10, 12}  # certificate / CRL has expired
_UNTRUSTED = {2, 18, 19, 20, 21, 27}

# RFC 5321 section 4.5.3.1.3: a reverse- or forward-path, "<" and ">" included, is at most
# 256 octets. Keeping to it also keeps every MAIL and RCPT we send (with SIZE, BODY and
# SMTPUTF8) inside the 512-octet command line of section 4.5.3.1.4.
MAX_PATH = 256
# C0 controls and DEL: RFC 5321 section 4.1.2 allows none of them in a path, not even
# quoted (qtextSMTP and quoted-pairSMTP are %d32-126), and a CR or LF would end the
# command line early (section 2.3.8). aiosmtplib refuses the same set with a ValueError.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_NAMES = {"\r": "CR", "\n": "LF", "\x00": "NUL", "\t": "TAB", "\x7f": "DEL"}

# Content above this is written in chunks of this size, each CRLF-normalised and
# dot-stuffed on its own, waiting for the socket between them: a big message costs one
# chunk of memory instead of aiosmtplib's several whole copies (issue 10, item 6). Up to
# it, aiosmtplib's single write is kept, the hot path for small messages.
DATA_CHUNK = 64 * 1024
# aiosmtplib's line ending rule (protocol.LINE_ENDINGS_REGEX: CRLF, or a lone LF or CR,
# each becomes CRLF) matching only the lone ones: CRLF text then has nothing to replace.
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def unsendable(address: str) -> str | None:
    """Why `address` cannot be carried in a MAIL or RCPT command line, or None if it can.

    Only what the protocol itself cannot carry: control characters (RFC 5321 sections
    2.3.8 and 4.1.2), text that is not UTF-8 (RFC 6531 section 3.3 carries UTF-8 only), a
    path over 256 octets (section 4.5.3.1.3). Anything else (syntax, non-ASCII without
    SMTPUTF8) is for the destination to answer: it replies, per recipient.
    """
    if not address.isprintable():  # cheap for the usual address; controls are unprintable
        control = _CONTROL.search(address)
        if control is not None:
            char = control.group()
            name = _CONTROL_NAMES.get(char) or f"U+{ord(char):04X}"
            return (
                f"holds a control character ({name}), which no SMTP command can carry "
                "(RFC 5321 sections 2.3.8 and 4.1.2)"
            )
    try:
        octets = len(address) if address.isascii() else len(address.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8 (RFC 6531 section 3.3)"
    if octets + 2 > MAX_PATH:
        return f"makes a path of {octets + 2} octets; RFC 5321 section 4.5.3.1.3 allows {MAX_PATH}"
    return None


def _shown(address: str) -> str:
    """An address for a reply line or a log: quoted, escaped to ASCII, cut when long."""
    return ascii(address) if len(address) <= 80 else ascii(address[:60]) + "..."


def screen(parcel: Parcel) -> tuple[Parcel | None, Results]:
    """The part of a parcel SMTP can carry (None: nothing), and events for the rest.

    A sender that cannot be carried fails every recipient at MAIL (RFC 3463 5.1.7); a
    recipient that cannot fails alone at RCPT (5.1.3) and the others are still sent.
    Without this, aiosmtplib raises ValueError mid-transaction for every attempt: one
    such message, always the oldest, stopped all mail for its connector (issue 10).
    """
    # The usual parcel (printable ASCII, short) in a few C calls: this runs per message.
    sender = parcel.mail_from
    if sender.isascii() and sender.isprintable() and len(sender) <= MAX_PATH - 2:
        for _, address in parcel.recipients:
            if not (address.isascii() and address.isprintable() and len(address) <= MAX_PATH - 2):
                break
        else:
            return parcel, {}
    why = unsendable(sender)
    if why is not None:
        event = WireEvent(Stage.MAIL, Failure.UNSENDABLE, f"Sender address {_shown(sender)} {why}")
        log.warning("id=%d: %s; not sent", parcel.message, event.detail)
        return None, {rid: event for rid, _ in parcel.recipients}
    results: Results = {}
    for rid, address in parcel.recipients:
        why = unsendable(address)
        if why is not None:
            detail = f"Recipient address {_shown(address)} {why}"
            results[rid] = WireEvent(Stage.RCPT, Failure.UNSENDABLE, detail)
            log.warning("id=%d: %s; not sent", parcel.message, detail)
    if not results:
        return parcel, results
    rest = tuple((rid, a) for rid, a in parcel.recipients if rid not in results)
    return (Parcel(parcel.message, parcel.mail_from, rest) if rest else None), results


def data_chunks(content: bytes, size: int = DATA_CHUNK) -> Iterator[bytes]:
    """The DATA content as sent, without the final ".": CRLF line endings, dot-stuffed
    (RFC 5321 section 4.5.2), ending with CRLF, in pieces of about `size` bytes.

    Byte for byte what aiosmtplib's execute_data_command writes (lone CR and lone LF
    become CRLF, a missing final CRLF is added, "." at a line start is doubled), done a
    piece at a time. At the seams: a CR ending a piece moves to the next one, so a CRLF
    split across them is never taken for a lone CR and a lone LF; a "." opening a piece
    is doubled only when the previous piece ended a line.
    """
    if size < 2:
        raise ValueError(f"data_chunks: size {size} must be at least 2 (a CR moves on)")
    total = len(content)
    start = 0
    line_start = True
    while start < total:
        end = min(start + size, total)
        if end < total and content[end - 1] == 0x0D:
            end -= 1
        piece = _BARE_LINE_END.sub(b"\r\n", content[start:end]).replace(b"\n.", b"\n..")
        if line_start and piece[:1] == b".":
            piece = b"." + piece
        line_start = piece[-1:] == b"\n"
        start = end
        yield piece
    if not line_start or total == 0:
        yield b"\r\n"


@dataclass(frozen=True, slots=True)
class TlsSettings:
    policy: TlsPolicy
    tls_domain: str = ""
    ca_file: Path | None = None


@dataclass(slots=True)
class Target:
    """Where an attempt goes: the route's hosts in order, with their TLS policy."""

    hosts: list[tuple[str, int]]
    tls: TlsSettings
    connect_timeout: float
    events: list[WireEvent] = field(default_factory=list)


class SessionBroken(RelayError, ConnectionError):
    """The session to a destination cannot go on; `event` says what happened on the wire."""

    def __init__(self, event: WireEvent) -> None:
        super().__init__(event.detail)
        self.event = event


def tls_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """The client context for a connector's TLS policy (Exchange's TlsSettings)."""
    if settings.policy is TlsPolicy.NONE:
        return None
    if settings.policy in (TlsPolicy.OPPORTUNISTIC, TlsPolicy.ENCRYPTION_ONLY):
        # Encryption without authentication, like Postfix's "may" and "encrypt".
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context = ssl.create_default_context()
    if settings.ca_file is not None:
        context.load_verify_locations(cafile=str(settings.ca_file))
    # certificate_validation checks the chain and dates; domain_validation also the name
    # (Python's matching follows RFC 6125, wildcards included).
    context.check_hostname = settings.policy is TlsPolicy.DOMAIN_VALIDATION
    return context


class SmtpAgent:
    """Delivers parcels for one route over as few connections as it can (a `DeliveryAgent`)."""

    def __init__(self, *, resolver: Resolver, hostname: str) -> None:
        self._resolver = resolver
        self._hostname = hostname
        self._contexts: dict[TlsSettings, ssl.SSLContext | None] = {}
        self._idle: dict[str, list[tuple[float, Session]]] = {}

    def _context(self, settings: TlsSettings) -> ssl.SSLContext | None:
        if settings not in self._contexts:
            self._contexts[settings] = tls_context(settings)
        return self._contexts[settings]

    async def target(self, route: Route) -> Target:
        """The hosts to try for a route; raises SessionBroken when the MX lookup fails."""
        connector = route.connector
        tls = TlsSettings(TlsPolicy.OPPORTUNISTIC)
        timeout = 30.0
        if connector is not None:
            ca = Path(connector.ca_file) if connector.ca_file else None
            tls = TlsSettings(connector.tls, connector.tls_domain, ca)
            timeout = connector.connect_timeout
            if not connector.use_mx:
                return Target(connector.destinations, tls, timeout)
        try:
            names = await self._resolver.mx(route.domain)
        except DnsError as exc:
            if route.kind is RouteKind.MX and exc.failure is Failure.DNS_NXDOMAIN:
                failure = Failure.DOMAIN_NXDOMAIN
            else:
                failure = exc.failure
            raise SessionBroken(
                WireEvent(Stage.RESOLVE, failure, exc.detail, server=route.domain)
            ) from None
        return Target([(name, 25) for name in names], tls, timeout)

    async def deliver(
        self,
        route: Route,
        parcels: Sequence[Parcel],
        content: Content,
    ) -> AsyncIterator[tuple[Parcel, Results]]:
        """Send each parcel in order over one connection, yielding its results.

        The connection comes from the route's cache when one is idle there, and goes back
        to it afterwards (Postfix's connection cache). When the destination cannot be
        reached, or the session breaks, every parcel not yet sent gets the same event: the
        destination is down for all of them (Exchange puts the whole queue in retry).

        One parcel never stops the others: addresses SMTP cannot carry fail before anything
        is sent (`screen`), and an unexpected exception fails only the parcel it hit; the
        connection it left in an unknown state is closed, and the next parcel opens another.

        Closed at a yield (the queue manager stopping: aclosing), the connection is between two
        transactions and gets a QUIT; one interrupted inside a transaction is closed.
        """
        screened = [screen(parcel) for parcel in parcels]  # once: each refusal logged once
        session: Session | None = None
        fresh = False  # skip the cache: a cached connection has just been found dead
        finished = False
        try:
            index = 0
            while index < len(parcels):
                parcel = parcels[index]
                sendable, results = screened[index]
                if sendable is None:
                    index += 1
                    yield parcel, results
                    continue
                try:
                    data = await content(parcel.message)
                except Exception as exc:  # the queue's failure, not this message's
                    log.error("id=%d: reading the content failed", parcel.message, exc_info=exc)
                    detail = f"reading the content failed: {type(exc).__name__}: {escaped(str(exc).strip())}"
                    event = WireEvent(Stage.DATA, Failure.INTERNAL, detail)
                    results = {**results, **{rid: event for rid, _ in sendable.recipients}}
                    index += 1
                    yield parcel, results
                    continue
                try:
                    if session is None:
                        cached = None if fresh else self._cached(route.key)
                        session = cached or await self._open(await self.target(route))
                    sent = await session.send(sendable, data)
                    results = {**results, **sent} if results else sent
                except SessionBroken as broken:
                    retry = session is not None and session.reused
                    if session is not None:
                        await session.close()
                        session = None
                    if retry and broken.event.failure is Failure.CLOSED:
                        # A cached connection the server had closed says nothing about the
                        # destination: open a fresh one and send this parcel again.
                        fresh = True
                        continue
                    for rest, (_, early) in zip(parcels[index:], screened[index:], strict=True):
                        events = {rid: broken.event for rid, _ in rest.recipients}
                        yield rest, {**events, **early}
                    return
                del data
                if session.in_transaction:  # an unexpected exception: state unknown
                    await session.close()
                    session = None
                else:
                    session.reused = False
                index += 1
                yield parcel, results
            finished = True
        finally:
            if session is not None:
                if finished and not session.in_transaction:
                    self._park(route.key, session)
                elif session.in_transaction:
                    await session.close()
                else:
                    await session.quit()

    @property
    def has_idle(self) -> bool:
        return any(self._idle.values())

    def _cached(self, key: str) -> Session | None:
        """An idle, still connected session to this route, if the cache has one."""
        idle = self._idle.get(key, [])
        while idle:
            parked_at, session = idle.pop()
            fresh = time.monotonic() - parked_at < CACHE_TIME_LIMIT
            if fresh and session.smtp.is_connected and not session.in_transaction:
                session.reused = True
                return session
            session.smtp.close()
        return None

    def _park(self, key: str, session: Session) -> None:
        idle = self._idle.setdefault(key, [])
        full = len(idle) >= CONNECTIONS_PER_ROUTE
        if full or not session.smtp.is_connected or session.in_transaction:
            session.smtp.close()
            return
        idle.append((time.monotonic(), session))

    async def close_idle(self, *, older_than: float = CACHE_TIME_LIMIT) -> None:
        """QUIT cached connections idle longer than `older_than` (0: all of them)."""
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            keep = [(t, s) for t, s in idle if now - t < older_than]
            for t, session in idle:
                if now - t >= older_than:
                    await session.quit()
            self._idle[key] = keep

    async def _open(self, target: Target) -> Session:
        """Try each host and address in order; the error kept is the last one tried."""
        last: WireEvent | None = None
        for name, port in target.hosts:
            try:
                addresses = await self._resolver.addresses(name)
            except DnsError as exc:
                last = WireEvent(Stage.RESOLVE, exc.failure, exc.detail, server=name)
                continue
            for ip in addresses:
                try:
                    return await self._connect(target, name, ip, port)
                except SessionBroken as broken:
                    last = broken.event
        assert last is not None, "a route always has at least one host"
        raise SessionBroken(last)

    async def _connect(self, target: Target, name: str, ip: str, port: int) -> Session:
        session = Session(name=name, ip=ip, port=port, hostname=self._hostname)
        settings = target.tls
        try:
            await session.connect(target.connect_timeout)
            if settings.policy is TlsPolicy.NONE:
                return session
            return await self._starttls(session, settings, target.connect_timeout)
        except SessionBroken:
            await session.close()
            raise

    async def _starttls(
        self, session: Session, settings: TlsSettings, connect_timeout: float
    ) -> Session:
        required = settings.policy in REQUIRED_TLS
        if not session.smtp.supports_extension("starttls"):
            if required:
                raise session.broken(
                    Stage.STARTTLS,
                    Failure.TLS_NOT_OFFERED,
                    f"STARTTLS is required to send mail, but {session.name} does not offer it "
                    f"(connector TLS: {settings.policy.value})",
                )
            return session
        sni = settings.tls_domain or (None if is_ip(session.name) else session.name)
        try:
            await session.starttls(self._context(settings), sni, settings)
        except _TlsFallback as fallback:
            if required:
                raise session.broken(Stage.STARTTLS, Failure.TLS_FAILED, str(fallback)) from None
            # Postfix's "may": a failed handshake is retried in plain text.
            log.info("%s: %s; retrying without TLS", session.name, fallback)
            await session.close()
            plain = Session(
                name=session.name, ip=session.ip, port=session.port, hostname=session.hostname
            )
            await plain.connect(connect_timeout)
            return plain
        return session


class _TlsFallback(Exception):
    """The TLS handshake failed for a reason other than the certificate."""


class Session:
    """One SMTP client connection (aiosmtplib), with failures turned into WireEvents."""

    def __init__(self, *, name: str, ip: str, port: int, hostname: str) -> None:
        self.name = name
        self.ip = ip
        self.port = port
        self.hostname = hostname
        self.reused = False  # taken from the connection cache, not yet used for a message
        # From MAIL until the final reply (or RSET): a QUIT now would land inside the
        # transaction, DATA content included, so such a session is closed, never cached.
        self.in_transaction = False
        self.tls: str | None = None  # the protocol once STARTTLS succeeded ("TLSv1.3")
        self.peer = f"{name}[{ip}]:{port}"  # as Postfix logs a server
        self.smtp = aiosmtplib.SMTP(
            hostname=ip,
            port=port,
            local_hostname=hostname,
            timeout=COMMAND_TIMEOUT,
            use_tls=False,
            start_tls=False,
            validate_certs=False,
        )

    @property
    def endpoint(self) -> str:
        return endpoint(self.ip, self.port)

    def broken(
        self,
        stage: Stage,
        failure: Failure,
        detail: str,
        *,
        code: int | None = None,
        reply: str = "",
    ) -> SessionBroken:
        return SessionBroken(
            WireEvent(
                stage,
                failure,
                detail,
                server=self.name,
                ip=self.ip,
                port=self.port,
                code=code,
                reply=reply,
                tls=self.tls,
            )
        )

    def event(self, stage: Stage, code: int, reply: str) -> WireEvent:
        return WireEvent(
            stage,
            Failure.REPLY,
            f"{code} {reply}",
            server=self.name,
            ip=self.ip,
            port=self.port,
            code=code,
            reply=reply,
            tls=self.tls,
        )

    def trace(self, command: str | None, reply: SMTPResponse | None = None) -> None:
        """At DEBUG (`relay serve -v`): a command sent and the reply received, a line for
        each reply line. Callers check `log.isEnabledFor(DEBUG)` first: this is the hot
        path, and with DEBUG off it must cost nothing."""
        if command is not None:
            log.debug("%s > %s", self.peer, escaped(command))
        if reply is not None:
            lines = reply.message.split("\n")
            last = len(lines) - 1
            for n, text in enumerate(lines):
                mark = " " if n == last else "-"
                log.debug("%s < %d%s%s", self.peer, reply.code, mark, escaped(text))

    async def connect(self, timeout: float) -> None:
        try:
            greeting = await self.smtp.connect(timeout=timeout)
        except SMTPConnectResponseError as exc:
            if log.isEnabledFor(logging.DEBUG):
                self.trace(None, SMTPResponse(exc.code, exc.message))
            raise self.broken(
                Stage.GREETING, Failure.REPLY, exc.message, code=exc.code, reply=exc.message
            ) from None
        except SMTPConnectTimeoutError as exc:
            stage = Stage.GREETING if "ready message" in str(exc) else Stage.CONNECT
            what = "no greeting" if stage is Stage.GREETING else "no answer to the TCP connect"
            raise self.broken(
                stage, Failure.TIMEOUT, f"{what} from {self.endpoint} within {timeout:g}s"
            ) from None
        except SMTPConnectError as exc:
            raise self._connect_failure(exc) from None
        if log.isEnabledFor(logging.DEBUG):
            self.trace(None, greeting)
        await self._ehlo()

    def _connect_failure(self, exc: SMTPConnectError) -> SessionBroken:
        cause = exc.__cause__
        if isinstance(cause, ConnectionRefusedError):
            return self.broken(
                Stage.CONNECT,
                Failure.REFUSED,
                f"connect to {self.endpoint} failed: connection refused",
            )
        if isinstance(cause, SMTPServerDisconnected):
            return self.broken(
                Stage.GREETING,
                Failure.CLOSED,
                f"{self.endpoint} closed the connection before its greeting",
            )
        if isinstance(cause, OSError) and cause.errno in (errno.ETIMEDOUT,):
            return self.broken(
                Stage.CONNECT, Failure.TIMEOUT, f"connect to {self.endpoint} timed out"
            )
        reason = getattr(cause, "strerror", None) or str(cause or exc)
        return self.broken(
            Stage.CONNECT, Failure.UNREACHABLE, f"connect to {self.endpoint} failed: {reason}"
        )

    async def _ehlo(self) -> None:
        debug = log.isEnabledFor(logging.DEBUG)
        try:
            try:
                reply = await self.smtp.ehlo()
                if debug:
                    self.trace(f"EHLO {self.hostname}", reply)
            except SMTPResponseException as exc:
                if debug:
                    self.trace(f"EHLO {self.hostname}", SMTPResponse(exc.code, exc.message))
                if exc.code < 500:
                    raise
                reply = await self.smtp.helo()  # RFC 5321 section 3.2: fall back to HELO on 5xx
                if debug:
                    self.trace(f"HELO {self.hostname}", reply)
        except SMTPResponseException as exc:
            raise self.broken(
                Stage.EHLO, Failure.REPLY, exc.message, code=exc.code, reply=exc.message
            ) from None
        except (SMTPServerDisconnected, ConnectionError):
            raise self.broken(
                Stage.EHLO, Failure.CLOSED, f"{self.endpoint} closed the connection after EHLO"
            ) from None
        except SMTPTimeoutError:
            raise self.broken(
                Stage.EHLO, Failure.TIMEOUT, f"{self.endpoint} did not answer EHLO in time"
            ) from None

    async def starttls(
        self, context: ssl.SSLContext | None, sni: str | None, settings: TlsSettings
    ) -> None:
        debug = log.isEnabledFor(logging.DEBUG)
        try:
            reply = await self.smtp.starttls(tls_context=context, server_hostname=sni)
        except ssl.SSLCertVerificationError as exc:
            raise self._certificate_failure(exc, settings) from None
        except SMTPResponseException as exc:
            if debug:
                self.trace("STARTTLS", SMTPResponse(exc.code, exc.message))
            if settings.policy in REQUIRED_TLS:
                raise self.broken(
                    Stage.STARTTLS, Failure.REPLY, exc.message, code=exc.code, reply=exc.message
                ) from None
            return  # opportunistic: the server declined; go on in plain text
        except (ssl.SSLError, SMTPServerDisconnected, SMTPTimeoutError, ConnectionError) as exc:
            raise _TlsFallback(f"TLS handshake with {self.endpoint} failed: {exc}") from None
        transport = self.smtp.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        self.tls = ssl_object.version() if ssl_object is not None else None
        if debug:
            self.trace("STARTTLS", reply)
            log.debug("%s: TLS %s", self.peer, self.tls)
        await self._ehlo()

    def _certificate_failure(
        self, exc: ssl.SSLCertVerificationError, settings: TlsSettings
    ) -> SessionBroken:
        code = exc.verify_code
        message = exc.verify_message or str(exc)
        if code in _EXPIRED:
            failure, what = Failure.CERT_EXPIRED, "CertificateExpired"
        elif code == 62 or "hostname mismatch" in message.lower():
            failure, what = (
                Failure.CERT_NAME,
                (f"SubjectMismatch Expected Subject: {settings.tls_domain}"),
            )
        elif code in _UNTRUSTED:
            failure, what = Failure.CERT_UNTRUSTED, "UntrustedRoot"
        else:
            failure, what = Failure.CERT_INVALID, "CertificateInvalid"
        detail = f"{what}: {message} (connector TLS: {settings.policy.value})"
        return self.broken(Stage.STARTTLS, failure, detail)

    async def send(self, parcel: Parcel, content: bytes) -> Results:
        """One transaction: MAIL, RCPT for each recipient, DATA; per-recipient results.

        Each command has COMMAND_TIMEOUT to be answered, DATA and the content together
        COMMAND_TIMEOUT + DATA_TIMEOUT: one deadline per transaction, moved before each
        command (a wait_for per command was a few percent of the relay's CPU at full load).

        One command at a time: aiosmtplib's protocol pairs each reply with the command that
        awaits it and drops replies nobody waits for yet, so RFC 2920 pipelining would need
        a protocol of our own. On a lab's LAN the round trips cost little.

        The connection going away or going silent raises SessionBroken (the destination's
        doing: every parcel waits). Any other exception becomes this parcel's result and
        leaves `in_transaction` set: the caller closes the connection, whose state nobody
        knows, and the route's other parcels go on over a fresh one.
        """
        smtp = self.smtp
        options: list[str] = []
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(content)}")
        if not content.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        addresses = [parcel.mail_from, *(a for _, a in parcel.recipients)]
        if not all(a.isascii() for a in addresses) and smtp.supports_extension("smtputf8"):
            options.append("SMTPUTF8")
        mail = f"MAIL FROM:<{parcel.mail_from}>" + "".join(f" {o}" for o in options)
        debug = log.isEnabledFor(logging.DEBUG)
        loop = asyncio.get_running_loop()
        stage = Stage.MAIL
        results: Results = {}
        accepted: list[int] = []
        current: int | None = None  # the recipient whose RCPT is under way
        try:
            async with asyncio.timeout(None) as deadline:
                deadline.reschedule(loop.time() + COMMAND_TIMEOUT)
                self.in_transaction = True
                reply = await smtp.execute_command(mail.encode("utf-8"), timeout=None)
                if debug:
                    self.trace(mail, reply)
                if reply.code != 250:
                    event = self.event(Stage.MAIL, reply.code, reply.message)
                    results = {rid: event for rid, _ in parcel.recipients}
                else:
                    stage = Stage.RCPT
                    for rid, address in parcel.recipients:
                        current = rid
                        deadline.reschedule(loop.time() + COMMAND_TIMEOUT)
                        command = f"RCPT TO:<{address}>".encode()
                        reply = await smtp.execute_command(command, timeout=None)
                        if debug:
                            self.trace(f"RCPT TO:<{address}>", reply)
                        if reply.code in (250, 251):
                            accepted.append(rid)
                        else:
                            results[rid] = self.event(Stage.RCPT, reply.code, reply.message)
                    current = None
                if accepted:
                    stage = Stage.DATA
                    deadline.reschedule(loop.time() + COMMAND_TIMEOUT + DATA_TIMEOUT)
                    protocol = smtp.protocol
                    try:
                        if len(content) > DATA_CHUNK or protocol is None:
                            reply = await self._stream(content)
                        else:  # aiosmtplib's single write, as before: the 2 KB hot path
                            reply = await protocol.execute_data_command(content, timeout=None)
                    except SMTPResponseException as exc:
                        if debug:
                            self.trace(
                                f"DATA ({len(content)} bytes)", SMTPResponse(exc.code, exc.message)
                            )
                        event = self.event(Stage.DATA, exc.code, exc.message)
                        results.update({rid: event for rid in accepted})
                    else:
                        if debug:
                            self.trace(f"DATA ({len(content)} bytes)", reply)
                        # The final reply carries the destination's own queue id.
                        delivered = Delivered(
                            f"{reply.code} {reply.message}", self.name, self.ip, self.port, self.tls
                        )
                        results.update(dict.fromkeys(accepted, delivered))
                        self.in_transaction = False
                        return results
                deadline.reschedule(loop.time() + COMMAND_TIMEOUT)
                if await self._reset():  # nothing was sent: the next parcel starts clean
                    self.in_transaction = False
                return results
        except TimeoutError:  # the deadline above, or aiosmtplib's own (SMTPTimeoutError)
            raise self.broken(
                stage,
                Failure.TIMEOUT,
                f"{self.endpoint} did not answer {stage.value.upper()} in time",
            ) from None
        except (SMTPServerDisconnected, OSError) as exc:  # ConnectionError, EPIPE and kin
            raise self.broken(
                stage,
                Failure.CLOSED,
                f"{self.endpoint} closed the connection during {stage.value.upper()} ({exc})",
            ) from None
        except Exception as exc:  # neither the connection nor a reply: see the docstring
            return self._abandoned(parcel, results, stage, current, exc)

    def _abandoned(
        self,
        parcel: Parcel,
        results: Results,
        stage: Stage,
        current: int | None,
        exc: Exception,
    ) -> Results:
        """Results for a transaction an unexpected exception ended.

        A ValueError while MAIL or RCPT is built is about the address (aiosmtplib's
        control character check, an encoding): that address cannot be sent, for good. Any
        other exception is the relay's own failure: every recipient not yet answered for
        waits for its next retry interval, with the exception as its last error.
        """
        text = escaped(f"{exc}".strip())
        what = f"{type(exc).__name__} during {stage.value.upper()} with {self.endpoint}"
        about_address = isinstance(exc, ValueError) and stage in (Stage.MAIL, Stage.RCPT)
        if about_address:
            log.warning("id=%d: %s: %s", parcel.message, what, text)
        else:
            log.error("id=%d: %s", parcel.message, what, exc_info=exc)
        undecided = [rid for rid, _ in parcel.recipients if rid not in results]
        internal = self.failed(stage, Failure.INTERNAL, f"{what}: {text}")
        refused = self.failed(stage, Failure.UNSENDABLE, f"{what}: {text}")
        for rid in undecided:
            if about_address and (stage is Stage.MAIL or rid == current):
                results[rid] = refused
            else:
                results[rid] = internal
        return results

    async def _stream(self, content: bytes) -> SMTPResponse:
        """DATA, the content, the final ".": raises SMTPResponseException when refused.

        For content above DATA_CHUNK; send() hands smaller content to aiosmtplib's
        execute_data_command in one write. These are the same bytes (see `data_chunks`), a chunk at a
        time, each handed to the transport only once it has drained the last (its buffer's
        high-water mark is 64 KiB), so a 35 MB message never has a second whole copy in
        memory. That uses aiosmtplib 5.1's protocol internals, which pyproject.toml pins
        and tests/test_delivery_stream.py checks: the command lock, `_response_pending` (a
        reply arriving while it is False is dropped), write, `_drain_helper` and
        read_response.
        """
        protocol = self.smtp.protocol
        if protocol is None:
            raise SMTPServerDisconnected("Server not connected")
        lock = protocol._command_lock
        if lock is None:
            raise SMTPServerDisconnected("Server not connected")
        async with lock:
            protocol._response_pending = True
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=None)
            if start.code != 354:
                raise SMTPDataError(start.code, start.message)
            # Expect the final reply from the first chunk on: a server that refuses early
            # (552, say) and reads on has its reply kept for the read below.
            protocol._response_pending = True
            for piece in data_chunks(content):
                protocol.write(piece)
                await protocol._drain_helper()
            protocol.write(b".\r\n")
            reply = await protocol.read_response(timeout=None)
        if reply.code != 250:
            raise SMTPDataError(reply.code, reply.message)
        return reply

    def failed(self, stage: Stage, failure: Failure, detail: str) -> WireEvent:
        return WireEvent(
            stage, failure, detail, server=self.name, ip=self.ip, port=self.port, tls=self.tls
        )

    async def _reset(self) -> bool:
        """RSET; False when it was refused (the server's state is then unknown)."""
        try:
            reply = await self.smtp.rset()
        except SMTPResponseException:
            return False
        if log.isEnabledFor(logging.DEBUG):
            self.trace("RSET", reply)
        return True

    async def quit(self) -> None:
        with contextlib.suppress(SMTPException, OSError):
            reply = await self.smtp.quit(timeout=5)
            if log.isEnabledFor(logging.DEBUG):
                self.trace("QUIT", reply)
        await self.close()

    async def close(self) -> None:
        self.smtp.close()
