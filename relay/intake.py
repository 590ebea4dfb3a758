"""The SMTP front end: aiosmtpd policy hooks that accept mail the way Exchange Online does.

It validates recipients and limits, writes the message to the queue and answers 250 only
after the commit. It never delivers: the worker does (see shared/DESIGN.md). Nothing a
client sends reaches a header, a file name or the store unless it is free of control
characters and valid UTF-8, and log lines show client text escaped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import re
import ssl
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.utils import make_msgid
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, _AuthMechAttr, _DataState, syntax

from relay.clock import Clock
from relay.errors import StoreError
from relay.headers import rfc5322_date
from relay.policy import Policy
from relay.routing import route
from relay.spool.protocol import Spool
from relay.spool.rows import NewMessage, NewRecipient
from relay.text import UNSAFE, escaped, printable

log = logging.getLogger("relay.intake")

BANNER_IDENT = "Microsoft ESMTP MAIL Service ready (mailflow-relay lab)"
MAIL_OK = "250 2.1.0 Sender OK"
# aiosmtpd's wording, which the relay has always sent (Exchange Online says "354 Start mail
# input; end with <CRLF>.<CRLF>").
DATA_GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"  # RFC 5321 section 4.5.3.1.8
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
TLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
STORE_FAILED = "451 4.3.0 Temporary server error, please try again later"
# Syntax errors in the envelope, Exchange Online's wording. Control characters and invalid
# UTF-8 get these too, at the command that carries them (Postfix answers 501 5.1.7 "Bad
# sender address syntax" and 501 5.1.3 "Bad recipient address syntax", and 500 5.5.2 for
# a line that is not UTF-8; 501 5.5.2 "Helo command rejected: Invalid name" for a HELO
# name with reject_invalid_helo_hostname). RFC 3463: X.1.7 is the sender's address,
# X.1.3 the recipient's, X.5.4 a command's arguments.
BAD_HELO = "501 5.5.4 Invalid domain name"
BAD_SENDER = "501 5.1.7 Invalid address"
BAD_RECIPIENT = "501 5.1.3 Invalid address"
BAD_ARGUMENTS = "501 5.5.4 Invalid arguments"
# aiosmtpd's reply to an address its parser cannot read, at MAIL and RCPT alike.
_MALFORMED = "553 5.1.3 Error: malformed address"
# How much of the content is searched for the header fields intake reads (Message-ID, Date,
# Subject): the header block, or this much of a message that has no body. Decoding a whole
# 35 MB header-only message to text cost more memory than the message itself.
HEAD_SCAN_LIMIT = 1 << 20

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


class _EscapeClientText(logging.Filter):
    """Escapes control characters and undecodable bytes in a log record's text arguments:
    aiosmtpd logs addresses, unknown commands and AUTH data with %s."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and UNSAFE.search(a) for a in args):
            record.args = tuple(escaped(a) if isinstance(a, str) else a for a in args)
        return True


_ESCAPE_CLIENT_TEXT = _EscapeClientText()
for _logger in (logging.getLogger("mail.log"), log):  # aiosmtpd's logger, and ours
    _logger.addFilter(_ESCAPE_CLIENT_TEXT)


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with Exchange's wording and RFC 2034 codes on every reply, no
    control characters or invalid UTF-8 in the envelope, a DATA phase whose timeout is per
    read, connection limits, and a shutdown that lets a transaction in DATA finish."""

    _replying_to_ehlo = False
    _hooks_bound = False
    _deadline = 0.0  # when the session times out (see _reset_timeout)
    _armed_for = 0.0  # when its timer fires
    # Defaults on the class, so that a connection only pays for what it uses (and aiosmtpd's
    # own constructor sees the same instance attributes, tests/test_intake_fast.py).
    _gate: _Gate | None = None
    _admitted = False  # counted by the gate (released when the connection is lost)
    _refusal = ""  # the 421 greeting for a connection over a limit
    _malformed = BAD_RECIPIENT  # what aiosmtpd's 553 5.1.3 becomes (see push)
    source_routed = False  # the last path parsed had a source route (<@a,@b:user@domain>)
    _in_data = False  # from DATA's 354 until its final reply
    _goodbye = ""  # set by shut_down(): the 421 to send once no transaction is under way
    _transaction_done: asyncio.Future[None] | None = None

    def __init__(self, handler: Any, *, gate: _Gate | None = None, **kwargs: Any) -> None:
        if kwargs.get("decode_data"):
            raise ValueError("RelaySMTP keeps the content as bytes; decode_data must be False")
        # aiosmtpd's constructor finds the smtp_*, auth_* and handle_* methods with dir(),
        # inspect.getmembers() and inspect.signature() on every connection: a tenth of the
        # intake's CPU time. It is given nothing to scan (no handler, an empty dir()), and
        # the same tables are filled from names looked up once per class (see
        # _method_names; tests/test_intake_fast.py checks them against aiosmtpd's own).
        # aiosmtpd keeps the per-command line limits in a dict on the class: every session's
        # EHLO grew MAIL's limit for all sessions and every new connection reset it for all.
        # Each session gets its own (RFC 5321 section 4.5.3.1.4: 512 octets, plus what
        # SIZE= and SMTPUTF8 add once advertised, RFC 1870 and RFC 6531 section 3.4).
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
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
        if gate is not None:
            self._gate = gate

    # ---- connection limits -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiosmtpd calls this again for the TLS transport after STARTTLS, with
        # _original_transport set; that is the same connection, counted once.
        first = self._original_transport is None
        super().connection_made(transport)
        if first and self._gate is not None:
            assert self.session is not None
            refusal = self._gate.admit(_client_ip(self.session))
            if refusal is None:
                self._admitted = True
            else:
                self._refusal = refusal

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted and self._gate is not None and self.session is not None:
            self._admitted = False
            self._gate.release(_client_ip(self.session))
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._refusal:
            # Over a limit: the greeting is the 421 and the connection closes, as Postfix's
            # smtpd does when anvil(8) counts one connection too many.
            assert self.session is not None
            log.warning("%s: %s", self.session.peer, self._refusal.partition(" Error: ")[2])
            await self.push(self._refusal)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    # ---- timeouts ----------------------------------------------------------------------

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

    def data_received(self, data: bytes) -> None:
        # RFC 5321 section 4.5.3.2: the DATA phase times out per block of data (3 minutes
        # per TCP send on the client's side), not for the whole content; a slow but steady
        # client must finish. So while in DATA, every read moves the session's deadline.
        if self._in_data:
            self._reset_timeout()
        super().data_received(data)

    def __dir__(self) -> list[str]:
        # Empty only while aiosmtpd's constructor scans it (see __init__).
        return list(super().__dir__()) if self._hooks_bound else []

    # ---- the envelope: nothing unsafe gets past its command -----------------------------

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if hostname and UNSAFE.search(hostname):
            await self.push(BAD_HELO)  # the name would go into our Received header
            return
        await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if hostname and UNSAFE.search(hostname):
            await self.push(BAD_HELO)
            return
        # A second EHLO must not grow MAIL's limit again (aiosmtpd adds to it per EHLO).
        self.command_size_limits.clear()
        # RFC 2034 section 3: the EHLO reply lines carry no enhanced codes.
        self._replying_to_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._replying_to_ehlo = False

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg is not None and UNSAFE.search(arg):
            await self.push(BAD_SENDER if _unsafe_in_path(arg) else BAD_ARGUMENTS)
            return
        self._malformed = BAD_SENDER
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if arg is not None and UNSAFE.search(arg):
            await self.push(BAD_RECIPIENT if _unsafe_in_path(arg) else BAD_ARGUMENTS)
            return
        self._malformed = BAD_RECIPIENT
        await super().smtp_RCPT(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if arg and UNSAFE.search(arg):
            await self.push(BAD_RECIPIENT)  # aiosmtpd would echo it
            return
        await super().smtp_VRFY(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # RFC 5321 section 4.1.2: Path = "<" [ A-d-l ":" ] Mailbox ">"; the email parser
        # drops the source route (A-d-l), which policy must still see (see handle_RCPT).
        self.source_routed = arg.lstrip().startswith("<@")
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
            status = self._malformed if status == _MALFORMED else _REWRITES.get(status, status)
            if UNSAFE.search(status):  # aiosmtpd echoes an unknown command in its reply
                status = printable(status)
            if (
                not self._replying_to_ehlo
                and status[:3] in _ENHANCED_BY_REPLY
                and status[3:4] == " "
                and not _HAS_ENHANCED.match(status)
            ):
                status = f"{status[:3]} {_ENHANCED_BY_REPLY[status[:3]]} {status[4:]}"
        await super().push(status)

    # ---- DATA ----------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd 1.4.6's SMTP.smtp_DATA (pinned in tests/test_intake_limits.py), with the
        # same replies and state handling, changed in three ways: every read moves the
        # session's deadline (data_received, while _in_data); the content grows in one
        # bytearray, dot-unstuffed line by line (RFC 5321 section 4.5.2), instead of a list
        # of per-line bytearrays joined into a second whole copy; and a connection that ends
        # without the final dot is not handed to the hook. The deprecated process_message()
        # API and decode_data are not carried over (the relay uses neither).
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        self._in_data = True
        try:
            await self.push(DATA_GO_AHEAD)
            state, content, complete = await self._read_content()
            if complete:
                await self._answer_content(state, content)
        finally:
            self._in_data = False
            if self._goodbye:  # shutting down: this was the session's last transaction
                self._say_goodbye()

    async def _read_content(self) -> tuple[_DataState, bytearray, bool]:
        """Lines up to the lone dot: (state, the unstuffed content, whether the dot came)."""
        data = bytearray()
        num_bytes = 0
        limit = self.data_size_limit
        line_fragments: list[bytes] = []
        state = _DataState.NOMINAL
        while self.transport is not None:  # pragma: nobranch
            # Since eof_received cancels this coroutine, readuntil() can never raise
            # asyncio.IncompleteReadError.
            try:
                line: bytes = await self._reader.readuntil(b"\r\n")
                log.debug("DATA readline: %s", line)
                assert line.endswith(b"\r\n")
            except asyncio.CancelledError:
                log.info("Connection lost during DATA")
                self._writer.close()
                raise
            except asyncio.LimitOverrunError as e:
                # The line exceeds the StreamReader's limit (line_length_limit); the reply
                # waits until the data is all read (RFC 5321 section 4.2.5).
                if state == _DataState.NOMINAL:
                    state = _DataState.TOO_LONG
                data.clear()
                line = await self._reader.read(e.consumed)
                assert not line.endswith(b"\r\n")
            if not line_fragments and line == b".\r\n":
                return state, data, True
            num_bytes += len(line)
            if state == _DataState.NOMINAL and limit and num_bytes > limit:
                state = _DataState.TOO_MUCH
                data.clear()
            line_fragments.append(line)
            if line.endswith(b"\r\n"):
                if state == _DataState.NOMINAL:
                    whole = line if len(line_fragments) == 1 else b"".join(line_fragments)
                    if len(whole) > self.line_length_limit:
                        state = _DataState.TOO_LONG
                        data.clear()
                    elif whole[:1] == b".":
                        data += memoryview(whole)[1:]
                    else:
                        data += whole
                line_fragments.clear()
        return state, data, False

    async def _answer_content(self, state: _DataState, content: bytearray) -> None:
        assert self.envelope is not None
        if state != _DataState.NOMINAL:
            if state == _DataState.TOO_LONG:
                await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            elif state == _DataState.TOO_MUCH:  # pragma: nobranch
                await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        # The hook (IntakeHandler.handle_DATA) takes the bytearray over: it adds the trace
        # headers in place and makes the one bytes copy that is stored.
        self.envelope.content = content  # type: ignore[assignment]
        self.envelope.original_content = content  # type: ignore[assignment]
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        self._reset_timeout()  # the client waits while we commit: idle time starts now
        await self.push("250 OK" if status is MISSING else status)

    # ---- shutdown ------------------------------------------------------------------------

    def shut_down(self, goodbye: str) -> asyncio.Future[None] | None:
        """Close this session for a shutdown: at once, with `goodbye` (a 421), when no
        transaction is in DATA; else after that transaction's final reply, and the returned
        future is done then. A message committed but not yet answered would come again."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return None
        self._goodbye = goodbye
        if self._in_data:
            self._transaction_done = self.loop.create_future()
            return self._transaction_done
        self._say_goodbye()
        return None

    def _say_goodbye(self) -> None:
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(self._goodbye.encode() + b"\r\n")
            transport.close()
        done = self._transaction_done
        if done is not None and not done.done():
            done.set_result(None)

    def cut(self) -> None:
        """Close at once, whatever the session is doing (after the shutdown's grace time)."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.abort()


def _unsafe_in_path(arg: str) -> bool:
    """Whether the first UNSAFE character of "FROM:<path> parameters" (or "TO:...") lies
    in the path rather than in the parameters."""
    first = UNSAFE.search(arg)
    return first is not None and first.start() < _path_end(arg)


def _path_end(arg: str) -> int:
    """Where the path ends: after its first ">" outside a quoted string (RFC 5321 section
    4.1.2: a quoted local part may hold ">"), or at the first space after the colon when
    the client sent no angle brackets."""
    start = arg.find("<")
    if start < 0:
        colon = arg.find(":") + 1
        rest = arg[colon:].lstrip(" ")
        space = rest.find(" ")
        return len(arg) if space < 0 else len(arg) - len(rest) + space
    quoted = escaped_char = False
    for index in range(start + 1, len(arg)):
        char = arg[index]
        if escaped_char:
            escaped_char = False
        elif char == "\\":
            escaped_char = quoted
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index + 1
    return len(arg)


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
        reply = policy.rcpt_reply(address, client_ip=_client_ip(session), source_route=routed)
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
        content = _prepend(received + headers, raw)
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
            content=content,
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
            len(content),
        )
        bracketed = f"<{message_id.strip().strip('<>')}>"
        return f"250 2.6.0 {bracketed} [InternalId={queue_id}] Queued mail for delivery"


def _client_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


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


def _complete_headers(
    raw: bytes | bytearray, *, now: float, hostname: str
) -> tuple[bytes, str, str]:
    """Headers to add (Message-ID, Date when missing, RFC 5322 section 3.6), the Message-ID,
    and the decoded subject."""
    end = raw.find(b"\r\n\r\n", 0, HEAD_SCAN_LIMIT)
    head = raw[:HEAD_SCAN_LIMIT] if end < 0 else raw[: end + 2]
    # RFC 6532 allows raw UTF-8 in headers (SMTPUTF8); decode it as such, not as Latin-1.
    fields = header_fields(head.decode("utf-8", errors="replace"), _WANTED)
    added = b""
    message_id = fields.get("message-id", "").strip()
    if not message_id:
        message_id = make_msgid(domain=hostname)
        added += f"Message-ID: {message_id}\r\n".encode()
    if "date" not in fields:
        added += f"Date: {rfc5322_date(now)}\r\n".encode()
    return added, message_id, _storable(decoded_subject(fields.get("subject")))


_LINE_SPACE = re.compile("[\t\r\n\x0b\x0c\x1c-\x1f\x85\u2028\u2029]")


def _storable(subject: str) -> str:
    """The subject as the queue keeps it (listed by `relay queue list`, on a terminal):
    whitespace controls as spaces, other control characters and undecodable bytes as "?"
    (an RFC 2047 encoded word can carry any of them)."""
    return printable(_LINE_SPACE.sub(" ", subject)) if UNSAFE.search(subject) else subject


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
    helo = printable(session.host_name or ip)  # refused at EHLO already; never a line break
    protocol = "ESMTP" if session.extended_smtp else "SMTP"
    if session.ssl is not None:
        protocol += "S"
    if envelope.smtp_utf8:
        protocol = "UTF8" + protocol.removeprefix("E")  # RFC 6531 section 4.3: UTF8SMTP(S)
    rcpt = printable(envelope.rcpt_tos[0]) if len(envelope.rcpt_tos) == 1 else None
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
            ident=f"{BANNER_IDENT} at {rfc5322_date(time.time())}",
            tls_context=tls,
            require_starttls=False,  # handle_MAIL answers 530 5.7.0 itself
            timeout=limits.idle_timeout,
            loop=loop,
        )
        intake.sessions.add(session)
        return session

    intake.server = await loop.create_server(factory, host=host, port=port)
    return intake
