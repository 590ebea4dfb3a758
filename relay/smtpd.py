"""aiosmtpd's SMTP protocol with the relay's overrides, written against aiosmtpd 1.4.6.

aiosmtpd keeps the protocol apart from policy: policy is a handler with handle_<VERB> hooks
(relay.intake.IntakeHandler). Where the relay must change the protocol itself, RelaySMTP
overrides, or leans on, a method of aiosmtpd's SMTP class that is not public API. Each one
here says which aiosmtpd 1.4.6 code it mirrors; pyproject.toml bounds aiosmtpd to 1.4.x,
and tests/test_intake_limits.py pins the source of every such method (and fails when
RelaySMTP overrides one it does not pin), so an upgrade that changes them fails in the
tests, not in a lab:

- the constructor (SMTP.__init__): its dir()/inspect scan of the protocol and the handler,
  done once per pair of classes (_method_names), and per-session command line limits;
- connection_made, connection_lost, _handle_client: the connection limits (a Gate);
- _reset_timeout and _timeout_cb: one idle timer per session, moved by a deadline;
- data_received (asyncio's StreamReaderProtocol): DATA times out per read;
- smtp_HELO, smtp_EHLO, smtp_MAIL, smtp_RCPT, smtp_VRFY: nothing unsafe gets past its
  command, and EHLO's line limits are the session's own;
- _getaddr: source routes are seen, plain addresses parsed without the email package;
- push: Exchange's wording and RFC 2034 enhanced codes on aiosmtpd's own replies;
- smtp_DATA (with check_helo_needed, check_auth_needed, _call_handler_hook and
  _set_post_data_state): the content in one buffer, the deadline moved per read;
- shut_down and cut: a shutdown lets a transaction in DATA have its final reply.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import re
from dataclasses import dataclass
from typing import Any, AnyStr, Protocol

from aiosmtpd.smtp import MISSING, SMTP, Session, _AuthMechAttr, _DataState, syntax

from relay.text import UNSAFE, escaped, printable

# One front end in the logs: the protocol's lines and the handler's share a logger.
log = logging.getLogger("relay.intake")

# aiosmtpd's wording, which the relay has always sent (Exchange Online says "354 Start mail
# input; end with <CRLF>.<CRLF>").
DATA_GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
TLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
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


class Gate(Protocol):
    """Counts connections by client address (relay.intake's limits gate)."""

    def admit(self, ip: str) -> str | None:
        """None, and the session is counted; or the 421 greeting that refuses it."""

    def release(self, ip: str) -> None: ...


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
    _gate: Gate | None = None
    _admitted = False  # counted by the gate (released when the connection is lost)
    _refusal = ""  # the 421 greeting for a connection over a limit
    _malformed = BAD_RECIPIENT  # what aiosmtpd's 553 5.1.3 becomes (see push)
    source_routed = False  # the last path parsed had a source route (<@a,@b:user@domain>)
    _in_data = False  # from DATA's 354 until its final reply
    _goodbye = ""  # set by shut_down(): the 421 to send once no transaction is under way
    _transaction_done: asyncio.Future[None] | None = None

    def __init__(self, handler: Any, *, gate: Gate | None = None, **kwargs: Any) -> None:
        if kwargs.get("decode_data"):
            raise ValueError("RelaySMTP keeps the content as bytes; decode_data must be False")
        # Mirrors the tables aiosmtpd 1.4.6's SMTP.__init__ builds (_handle_hooks,
        # _ehlo_hook_ver, _smtp_methods, _auth_methods). It finds the smtp_*, auth_* and
        # handle_* methods with dir(), inspect.getmembers() and inspect.signature() on every
        # connection: a tenth of the intake's CPU time. Here it is given nothing to scan
        # (_NO_HOOKS, and an empty __dir__ until _hooks_bound), and the same tables are
        # filled from names looked up once per class (_method_names;
        # tests/test_intake_fast.py compares them with aiosmtpd's own).
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
        # Extends aiosmtpd 1.4.6's SMTP.connection_made, which creates the session and
        # starts _handle_client. aiosmtpd calls it again for the TLS transport after
        # STARTTLS, with _original_transport set; that is the same connection, counted once.
        first = self._original_transport is None
        super().connection_made(transport)
        if first and self._gate is not None:
            assert self.session is not None
            refusal = self._gate.admit(client_ip(self.session))
            if refusal is None:
                self._admitted = True
            else:
                self._refusal = refusal

    def connection_lost(self, error: Exception | None) -> None:
        # Extends aiosmtpd 1.4.6's SMTP.connection_lost (it cancels the timer and the
        # session's task): the gate hears of the close first.
        if self._admitted and self._gate is not None and self.session is not None:
            self._admitted = False
            self._gate.release(client_ip(self.session))
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        # Wraps aiosmtpd 1.4.6's SMTP._handle_client, the session's loop: it sends the 220
        # greeting, then reads and dispatches command lines. The envelope checks below rely
        # on how it decodes a line (an ASCII verb, UTF-8 arguments with surrogateescape,
        # read up to LF and stripped of CR and LF).
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
        # Replaces aiosmtpd 1.4.6's SMTP._reset_timeout, which cancels the idle timer and
        # schedules a new one after every command; here the command moves a deadline and
        # the one timer re-arms itself when it fires early (_on_deadline).
        loop = self.loop
        self._deadline = loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or self._armed_for > self._deadline:
            if handle is not None:
                handle.cancel()
            self._armed_for = self._deadline
            self._timeout_handle = loop.call_at(self._deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        # Ends in aiosmtpd 1.4.6's SMTP._timeout_cb, where its own timer would have.
        if self.loop.time() < self._deadline:
            self._armed_for = self._deadline
            self._timeout_handle = self.loop.call_at(self._deadline, self._on_deadline)
            return
        self._timeout_cb()  # type: ignore[no-untyped-call]

    def data_received(self, data: bytes) -> None:
        # Extends asyncio's StreamReaderProtocol.data_received (aiosmtpd has none).
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
    # Each smtp_<VERB> checks its argument, then runs aiosmtpd 1.4.6's own SMTP.smtp_<VERB>.

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
        # A second EHLO must not grow MAIL's limit again: aiosmtpd 1.4.6's smtp_EHLO adds
        # to it (26 for SIZE=, 10 for SMTPUTF8) on every EHLO.
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
        # Mirrors aiosmtpd 1.4.6's SMTP._getaddr (the address and the rest of the line, by
        # email._header_value_parser's angle-addr parser) and falls back to it.
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
        # Extends aiosmtpd 1.4.6's SMTP.push (encode, write, drain), which every built-in
        # reply goes through: the reply is reworded first.
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

    # ---- shutdown (the relay's own; aiosmtpd has no graceful close) -----------------------

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
    """What aiosmtpd 1.4.6's SMTP.__init__ derives from dir() and inspect, once per pair of
    classes.

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


def client_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")
