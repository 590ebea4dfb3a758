"""The SMTP front end: aiosmtpd policy hooks that accept mail the way Exchange Online does.

It validates recipients and limits, writes the message to the queue and answers 250 only
after the commit. It never delivers: the worker does (see shared/DESIGN.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import re
import ssl
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.utils import format_datetime, make_msgid
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, Envelope, Session, _AuthMechAttr

from relay.clock import Clock
from relay.policy import Policy
from relay.routing import route
from relay.store import NewMessage, NewRecipient, Store, StoreError

log = logging.getLogger("relay.intake")

BANNER_IDENT = "Microsoft ESMTP MAIL Service ready (mailflow-relay lab)"
MAIL_OK = "250 2.1.0 Sender OK"
DATA_GO_AHEAD = "354 Start mail input; end with <CRLF>.<CRLF>"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"  # RFC 5321 section 4.5.3.1.8
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
TLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
STORE_FAILED = "451 4.3.0 Temporary server error, please try again later"

# RFC 2034: once ENHANCEDSTATUSCODES is advertised, every reply but the greeting and the
# EHLO lines carries an enhanced code. aiosmtpd's built-in replies lack them; these are the
# codes Postfix uses for the same situations.
_ENHANCED_BY_REPLY = {
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "550": "5.0.0",
    "553": "5.1.3",
    "554": "5.3.0",
    "555": "5.5.4",
    "250": "2.0.0",
    "221": "2.0.0",
    "252": "2.0.0",
    "421": "4.3.0",
    "451": "4.3.0",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}\b")
# RFC 5321 section 4.1.2: Path = "<" Mailbox ">", here only with a Dot-string local part
# and an ASCII domain (the rest, quoted strings or UTF-8, is left to aiosmtpd's parser).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(
    rf"^\s*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    rf"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)>(.*)$",
    re.DOTALL,
)
_REWRITES = {
    # aiosmtpd's wording for the two size checks (MAIL SIZE=, and growth during DATA).
    "552 Error: message size exceeds fixed maximum message size": TOO_BIG,
    "552 Error: Too much mail data": TOO_BIG,
    "221 Bye": "221 2.0.0 Service closing transmission channel",
    "530 Must issue a STARTTLS command first": TLS_FIRST,
}


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with Exchange's wording and RFC 2034 codes on every reply."""

    _replying_to_ehlo = False
    _hooks_bound = False
    _deadline = 0.0  # when the session times out (see _reset_timeout)
    _armed_for = 0.0  # when its timer fires

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        # aiosmtpd's constructor finds the smtp_*, auth_* and handle_* methods with dir(),
        # inspect.getmembers() and inspect.signature() on every connection: a tenth of the
        # intake's CPU time. It is given nothing to scan (no handler, an empty dir()), and
        # the same tables are filled from names looked up once per class (see
        # _method_names; tests/test_intake_fast.py checks them against aiosmtpd's own).
        super().__init__(_NO_HOOKS, **kwargs)
        self._hooks_bound = True
        self.event_handler = handler
        names = _method_names(type(self), type(handler))
        self._handle_hooks = {name: getattr(handler, attr) for name, attr in names.hooks}
        self._ehlo_hook_ver = "new" if "EHLO" in self._handle_hooks else None
        self._smtp_methods = _BoundOnLookup(self, names.commands)  # type: ignore[assignment]
        self._auth_methods = {
            name: _AuthMechAttr(getattr(self, attr), True) for name, attr in names.auth
        }

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels the idle timer and schedules a new one after every command; here
        # the command moves a deadline and the one timer re-arms itself when it fires early.
        loop = self.loop
        self._deadline = loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or self._armed_for > self._deadline:
            if handle is not None:
                handle.cancel()
            self._armed_for = self._deadline
            self._timeout_handle = loop.call_at(self._deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        if self.loop.time() < self._deadline:
            self._armed_for = self._deadline
            self._timeout_handle = self.loop.call_at(self._deadline, self._on_deadline)
            return
        self._timeout_cb()  # type: ignore[no-untyped-call]

    def __dir__(self) -> list[str]:
        # Empty only while aiosmtpd's constructor scans it (see __init__).
        return list(super().__dir__()) if self._hooks_bound else []

    async def smtp_EHLO(self, hostname: str) -> None:
        # RFC 2034 section 3: the EHLO reply lines carry no enhanced codes.
        self._replying_to_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._replying_to_ehlo = False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # The common case, <dot-atom@domain>, without the email package's full parser: it
        # was a tenth of the intake's CPU time. Anything else goes the long way.
        plain = _PLAIN_PATH.match(arg)
        if plain is not None:
            return plain.group(1), plain.group(2).lstrip()
        # aiosmtpd takes "<user@host" (no closing bracket) as an address; RFC 5321 does not.
        if arg.lstrip().startswith("<") and ">" not in arg:
            return None, None
        return super()._getaddr(arg)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            status = _REWRITES.get(status, status)
            if (
                not self._replying_to_ehlo
                and status[:3] in _ENHANCED_BY_REPLY
                and status[3:4] == " "
                and not _HAS_ENHANCED.match(status)
            ):
                status = f"{status[:3]} {_ENHANCED_BY_REPLY[status[:3]]} {status[4:]}"
        await super().push(status)


class _NoHooks:
    """The handler aiosmtpd's constructor sees: nothing for it to scan."""

    def __dir__(self) -> list[str]:
        return []


_NO_HOOKS = _NoHooks()


class _BoundOnLookup:
    """aiosmtpd's table of smtp_* methods, bound when a command is looked up rather than
    all thirty when a connection opens (what aiosmtpd uses of a dict: get, items, keys)."""

    __slots__ = ("_names", "_owner")

    def __init__(self, owner: object, names: dict[str, str]) -> None:
        self._owner = owner
        self._names = names

    def get(self, name: str, default: Any = None) -> Any:
        attr = self._names.get(name)
        return default if attr is None else getattr(self._owner, attr)

    def keys(self) -> Any:
        return self._names.keys()

    def items(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self._owner, attr)) for name, attr in self._names.items()]

    def __contains__(self, name: object) -> bool:
        return name in self._names


@dataclass(frozen=True)
class _MethodNames:
    hooks: tuple[tuple[str, str], ...]  # ("EHLO", "handle_EHLO"), ...
    commands: dict[str, str]  # {"EHLO": "smtp_EHLO", ...}
    auth: tuple[tuple[str, str], ...]  # ("PLAIN", "auth_PLAIN"), ...


_NAMES: dict[tuple[type, type], _MethodNames] = {}


def _method_names(protocol: type[SMTP], handler: type) -> _MethodNames:
    """What aiosmtpd's constructor derives from dir() and inspect, once per pair of classes.

    The handler's own auth_* methods are not looked at: ours has none (we offer no AUTH,
    like Exchange Online's MX).
    """
    names = _NAMES.get((protocol, handler))
    if names is None:
        names = _NAMES[protocol, handler] = _scan(protocol, handler)
    return names


def _scan(protocol: type[SMTP], handler: type) -> _MethodNames:
    hooks = tuple((n.removeprefix("handle_"), n) for n in dir(handler) if n.startswith("handle_"))
    ehlo = dict(hooks).get("EHLO")
    if ehlo is not None and len(inspect.signature(getattr(handler, ehlo)).parameters) != 6:
        raise TypeError(f"{handler.__name__}.handle_EHLO must take the 5-argument form")
    commands = {n.removeprefix("smtp_"): n for n in dir(protocol) if n.startswith("smtp_")}
    auth = tuple(
        (
            getattr(getattr(protocol, n), "__auth_mechanism_name__", None)
            or n.removeprefix("auth_").replace("__", "-"),
            n,
        )
        for n in dir(protocol)
        if n.startswith("auth_")
    )
    return _MethodNames(hooks, commands, auth)


class IntakeHandler:
    """aiosmtpd handler: Exchange Online's recipient rules, limits and acceptance reply."""

    def __init__(
        self,
        *,
        store: Store,
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
        lines[0] = f"250-{self._hostname} Hello [{_client_ip(session)}]"
        lines += ["250-PIPELINING", "250 ENHANCEDSTATUSCODES"]
        return lines

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self._require_tls and session.ssl is None:
            return TLS_FIRST
        if address != "<>" and "@" not in address:
            return "501 5.1.7 Invalid address"
        # aiosmtpd reads an empty sender as "no MAIL yet"; the null sender stays "<>" here
        # and becomes "" when the message is queued.
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return MAIL_OK

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if "@" not in address:
            return "501 5.1.3 Invalid address"
        if len(envelope.rcpt_tos) >= self._max_recipients:
            return TOO_MANY_RECIPIENTS
        reply = self._policy().rcpt_reply(address, client_ip=_client_ip(session))
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
        headers, message_id, subject = _complete_headers(raw, now=now, hostname=self._hostname)
        received = _received_header(
            session=session, hostname=self._hostname, queue_id=queue_id, envelope=envelope, now=now
        )
        policy = self._policy()
        message = NewMessage(
            id=queue_id,
            message_id=message_id,
            mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            subject=subject,
            received_at=now,
            expires_at=now + self._expiration,
            client_address=_client_ip(session),
            client_helo=session.host_name or "",
            recipients=[NewRecipient(a, route(a, policy).label) for a in envelope.rcpt_tos],
            content=received + headers + raw,
        )
        try:
            await self._store.enqueue(message)
        except StoreError as exc:
            log.error("queueing failed, answered 451: %s", exc)
            return STORE_FAILED
        log.info(
            "queued id=%d from=<%s> rcpts=%d size=%d",
            queue_id,
            message.mail_from,
            len(message.recipients),
            len(message.content),
        )
        bracketed = f"<{message_id.strip().strip('<>')}>"
        return f"250 2.6.0 {bracketed} [InternalId={queue_id}] Queued mail for delivery"


def rfc5322_date(timestamp: float) -> str:
    """ "Fri, 27 Nov 2026 05:26:32 +0000": UTC written as +0000, not the "unknown" -0000."""
    return _date_of_second(int(timestamp))


@functools.lru_cache(maxsize=8)
def _date_of_second(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))


def _client_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


def _complete_headers(raw: bytes, *, now: float, hostname: str) -> tuple[bytes, str, str]:
    """Headers to add (Message-ID, Date when missing, RFC 5322 section 3.6), the Message-ID,
    and the decoded subject."""
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[: end + 2]
    # RFC 6532 allows raw UTF-8 in headers (SMTPUTF8); decode it as such, not as Latin-1.
    fields = header_fields(head.decode("utf-8", errors="replace"), _WANTED)
    added = b""
    message_id = fields.get("message-id", "").strip()
    if not message_id:
        message_id = make_msgid(domain=hostname)
        added += f"Message-ID: {message_id}\r\n".encode()
    if "date" not in fields:
        added += f"Date: {rfc5322_date(now)}\r\n".encode()
    return added, message_id, decoded_subject(fields.get("subject"))


_WANTED = frozenset({"message-id", "date", "subject"})


def header_fields(head: str, names: frozenset[str]) -> dict[str, str]:
    """The first occurrence of each named header field, unfolded (RFC 5322 section 2.2.3).

    A plain scan instead of the email package's parser, which cost more than the rest of
    the intake's header work together.
    """
    fields: dict[str, str] = {}
    current = ""
    for line in head.splitlines():
        if line[:1] in (" ", "\t"):
            if current:
                fields[current] += line
            continue
        name, colon, value = line.partition(":")
        key = name.strip().lower()
        current = key if colon and key in names and key not in fields else ""
        if current:
            fields[current] = value.strip()
    return fields


def decoded_subject(value: Any) -> str:
    if value is None:
        return ""
    if "=?" not in str(value):  # no RFC 2047 encoded words: nothing to decode
        return str(value)
    try:
        return str(make_header(decode_header(str(value)))).replace("\r\n", "").replace("\n", "")
    except (ValueError, LookupError, UnicodeError):
        return str(value)


def _received_header(
    *, session: Session, hostname: str, queue_id: int, envelope: Envelope, now: float
) -> bytes:
    """The trace header RFC 5321 section 4.4 asks every relay to prepend."""
    ip = _client_ip(session)
    helo = session.host_name or ip
    protocol = "ESMTP" if session.extended_smtp else "SMTP"
    if session.ssl is not None:
        protocol += "S"
    if envelope.smtp_utf8:
        protocol = "UTF8" + protocol.removeprefix("E")  # RFC 6531 section 4.3: UTF8SMTP(S)
    rcpt = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
    line = f"Received: from {helo} ([{ip}]) by {hostname} with {protocol} id {queue_id}"
    if rcpt:
        line += f"\r\n\tfor <{rcpt}>"
    line += f"; {rfc5322_date(now)}\r\n"
    return line.encode("utf-8")


def tls_context(certificate: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    return context


class IntakeServer:
    """The listening socket and the sessions it has open (so stop() can cut them)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.sessions: weakref.WeakSet[RelaySMTP] = weakref.WeakSet()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        # Sessions still open are cut: nothing they had not been answered 250 for was accepted.
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
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
) -> IntakeServer:
    """Listen on host:port; each connection gets its own RelaySMTP protocol instance."""
    loop = asyncio.get_running_loop()
    intake = IntakeServer()

    def factory() -> RelaySMTP:
        session = RelaySMTP(
            handler,
            data_size_limit=max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident=f"{BANNER_IDENT} at {rfc5322_date(time.time())}",
            tls_context=tls,
            require_starttls=False,  # handle_MAIL answers 530 5.7.0 itself
            timeout=300,  # RFC 5321 section 4.5.3.2.7: server timeout of 5 minutes
            loop=loop,
        )
        intake.sessions.add(session)
        return session

    intake.server = await loop.create_server(factory, host=host, port=port)
    return intake
