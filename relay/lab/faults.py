"""The lab's misbehaving peers: one loopback endpoint per connector failure mode.

Each `Fault` is a real server (or a real absence of one) that makes a
delivery attempt end the way a real on-premises or partner server would,
so the relay produces the matching mail flow intelligence code. The test
suite and `relay lab faults` start exactly the same peers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TextIO

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from relay.errors import FaultUnavailable, LabOptionError
from relay.lab.certs import LabCA
from relay.lab.dns import LabDnsServer
from relay.net import endpoint

log = logging.getLogger(__name__)

LAB_DOMAIN = "lab.test"
WRONG_NAME = f"wrong-name.{LAB_DOMAIN}"

GREETING_421_REPLY = "421 4.3.2 Service not available, closing transmission channel"
RCPT_451_REPLY = "451 4.7.1 Greylisted, try again later"
RCPT_550_REPLY = "550 5.1.1 User unknown"
STARTTLS_502_REPLY = "502 5.5.1 Command not implemented"

# How long a probe connect may take before we call the backlog full. Loopback
# connects complete in microseconds, so 0.2 s only ever expires on a dropped SYN.
_PROBE_TIMEOUT = 0.2
_MAX_BACKLOG_FILLERS = 16


class Fault(StrEnum):
    """An SMTP endpoint's way of failing (GOOD is the control that does not)."""

    GOOD = "good"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    GREETING_421 = "greeting-421"
    NO_STARTTLS = "no-starttls"
    DROP_AFTER_EHLO = "drop-after-ehlo"
    DROP_IN_DATA = "drop-in-data"
    CERT_EXPIRED = "cert-expired"
    CERT_WRONG_NAME = "cert-wrong-name"
    CERT_UNTRUSTED = "cert-untrusted"
    RCPT_451 = "rcpt-451"
    RCPT_550 = "rcpt-550"


class DnsFault(StrEnum):
    """A smart host name whose lookup fails in the lab DNS (no endpoint behind it)."""

    NXDOMAIN = "nxdomain"
    SERVFAIL = "servfail"
    SILENT = "silent"


def lab_name(mode: Fault | DnsFault) -> str:
    """The DNS name of a mode's smart host, e.g. `cert-expired.lab.test`."""
    return f"{mode}.{LAB_DOMAIN}"


# mode -> (expected enhanced code, the comment printed above its connector).
# The code is what the relay must report for a message routed to that mode;
# "" means delivered.
_EXPECT: dict[str, tuple[str, str]] = {
    Fault.GOOD: ("", "delivered (250), over TLS with a valid certificate"),
    Fault.REFUSED: ("4.4.316", "450 4.4.316 Connection refused"),
    Fault.TIMEOUT: ("4.4.315", "450 4.4.315 Connection timed out"),
    Fault.GREETING_421: ("4.4.317", "450 4.4.317 Cannot connect to remote server (421 greeting)"),
    Fault.NO_STARTTLS: ("4.4.317", "450 4.4.317 Cannot connect to remote server (no STARTTLS)"),
    Fault.DROP_AFTER_EHLO: ("4.4.318", "450 4.4.318 Connection was closed abruptly (after EHLO)"),
    Fault.DROP_IN_DATA: ("4.4.318", "450 4.4.318 Connection was closed abruptly (during DATA)"),
    Fault.CERT_EXPIRED: ("4.7.320", "450 4.7.320 Certificate validation failed (expired)"),
    Fault.CERT_WRONG_NAME: ("4.7.320", "450 4.7.320 Certificate validation failed (name)"),
    Fault.CERT_UNTRUSTED: ("4.7.320", "450 4.7.320 Certificate validation failed (unknown CA)"),
    Fault.RCPT_451: ("4.7.1", f"{RCPT_451_REPLY} (the remote's reply, retried)"),
    Fault.RCPT_550: ("5.1.1", f"{RCPT_550_REPLY} (permanent: NDR at once)"),
    DnsFault.NXDOMAIN: ("4.4.312", "450 4.4.312 DNS query failed (NXDOMAIN)"),
    DnsFault.SERVFAIL: ("4.4.312", "450 4.4.312 DNS query failed (SERVFAIL)"),
    DnsFault.SILENT: ("4.4.312", "450 4.4.312 DNS query failed (no answer)"),
}

EXPECTED: dict[str, str] = {str(mode): code for mode, (code, _) in _EXPECT.items()}
"""Mode name -> the enhanced status code the relay must report ("" = delivered)."""

# The connector TLS policy that makes each mode fail for its intended reason;
# anything not listed uses opportunistic TLS. (mode -> (tls, tls_domain))
_TLS_POLICY: dict[str, tuple[str, str]] = {
    Fault.GOOD: ("certificate_validation", ""),
    Fault.NO_STARTTLS: ("encryption_only", ""),
    Fault.CERT_EXPIRED: ("certificate_validation", ""),
    Fault.CERT_WRONG_NAME: ("domain_validation", lab_name(Fault.CERT_WRONG_NAME)),
    Fault.CERT_UNTRUSTED: ("certificate_validation", ""),
}


@dataclass(frozen=True)
class Received:
    """One message a lab peer accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    tls: bool


class FaultServer(ABC):
    """One endpoint. `port` holds the real port once started (port 0 asks the OS)."""

    def __init__(self, fault: Fault, *, host: str, port: int) -> None:
        self.fault = fault
        self.host = host
        self.port = port
        # Only the ESMTP peers accept messages; the list stays empty elsewhere
        # so callers need not care which kind of server they hold.
        self.received: list[Received] = []

    @property
    def name(self) -> str:
        return lab_name(self.fault)

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...


def _tcp_socket(host: str) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM)


class ClosedPort(FaultServer):
    """REFUSED: a port that is bound but not listening, so connects get a TCP RST.

    Holding the bound socket (without SO_REUSEADDR) keeps anyone else from
    starting a listener on the port while the lab runs.
    """

    def __init__(self, *, host: str, port: int) -> None:
        super().__init__(Fault.REFUSED, host=host, port=port)
        self._socket: socket.socket | None = None

    async def start(self) -> None:
        sock = _tcp_socket(self.host)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._socket = sock

    async def stop(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class BlackHole(FaultServer):
    """TIMEOUT: a listener that never accepts, with its accept queue already full.

    Linux drops a SYN when the listener's accept queue is full (it does not
    answer RST), so the client retransmits until its own connect timeout:
    exactly a server that has gone away behind a silent firewall. With a
    backlog of 0 the queue holds one connection; we connect to ourselves
    until a probe stops completing, then keep those sockets open.
    """

    def __init__(self, *, host: str, port: int) -> None:
        super().__init__(Fault.TIMEOUT, host=host, port=port)
        self._listener: socket.socket | None = None
        self._fillers: list[socket.socket] = []

    async def start(self) -> None:
        listener = _tcp_socket(self.host)
        listener.bind((self.host, self.port))
        listener.listen(0)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        try:
            await self._fill_backlog()
        except BaseException:
            await self.stop()
            raise

    async def _fill_backlog(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        address = self._listener.getsockname()
        for _ in range(_MAX_BACKLOG_FILLERS):
            probe = _tcp_socket(self.host)
            probe.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(probe, address), _PROBE_TIMEOUT)
            except TimeoutError:
                probe.close()  # its SYN was dropped: the queue is full
                return
            self._fillers.append(probe)
        raise FaultUnavailable(
            f"timeout peer on {endpoint(self.host, self.port)}: connects still complete after "
            f"{_MAX_BACKLOG_FILLERS} queued connections; this OS answers a full backlog "
            "instead of dropping the SYN, so the TIMEOUT fault cannot be reproduced here"
        )

    async def stop(self) -> None:
        for filler in self._fillers:
            filler.close()
        self._fillers.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class ScriptedSmtp(FaultServer):
    """GREETING_421, DROP_AFTER_EHLO, DROP_IN_DATA: a hand-written SMTP dialogue.

    aiosmtpd always finishes a command it has started; these peers must stop
    in the middle, so they speak just enough SMTP themselves.
    """

    MODES = frozenset({Fault.GREETING_421, Fault.DROP_AFTER_EHLO, Fault.DROP_IN_DATA})

    def __init__(self, fault: Fault, *, host: str, port: int) -> None:
        if fault not in self.MODES:
            raise ValueError(f"ScriptedSmtp cannot play {fault!r}; it plays {sorted(self.MODES)}")
        super().__init__(fault, host=host, port=port)
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._clients:
                writer.close()
            await asyncio.gather(*self._clients.values(), return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients[writer] = task
        try:
            if self.fault is Fault.GREETING_421:
                # RFC 5321 section 3.1: a server may refuse service in its greeting.
                await _send(writer, GREETING_421_REPLY)
            else:
                await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.pop(writer, None)
            writer.close()  # for the DROP modes this close *is* the fault

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer like a healthy server until the point where this mode hangs up."""
        await _send(writer, f"220 {self.name} ESMTP mailflow-relay lab peer")
        greeted = False
        while line := await reader.readline():
            if greeted and self.fault is Fault.DROP_AFTER_EHLO:
                return
            verb = line.split(maxsplit=1)[0].upper() if line.strip() else b""
            if verb == b"EHLO":
                greeted = True
                await _send(writer, f"250-{self.name}", "250-8BITMIME", "250 SIZE 10485760")
            elif verb == b"HELO":
                greeted = True
                await _send(writer, f"250 {self.name}")
            elif verb in {b"MAIL", b"RCPT", b"RSET", b"NOOP"}:
                await _send(writer, "250 2.0.0 OK")
            elif verb == b"DATA":
                await _send(writer, "354 Start mail input; end with <CRLF>.<CRLF>")
                # Take the whole message before hanging up: closing with unread
                # bytes would turn the FIN into an RST racing the client's
                # writes. Either way the client never sees a final reply.
                await _read_message(reader)
                return
            elif verb == b"QUIT":
                await _send(writer, "221 2.0.0 Bye")
                return
            else:
                await _send(writer, "502 5.5.2 Command not recognized")


async def _send(writer: asyncio.StreamWriter, *lines: str) -> None:
    writer.write("".join(f"{line}\r\n" for line in lines).encode("ascii"))
    await writer.drain()


async def _read_message(reader: asyncio.StreamReader) -> None:
    """Read DATA content up to the lone "." line (RFC 5321 section 4.1.1.4) or EOF."""
    while line := await reader.readline():
        if line in (b".\r\n", b".\n"):
            return


_RCPT_REPLIES = {Fault.RCPT_451: RCPT_451_REPLY, Fault.RCPT_550: RCPT_550_REPLY}


class _Handler:
    """aiosmtpd policy hooks: accept and record, or refuse every recipient."""

    def __init__(self, received: list[Received], *, rcpt_reply: str | None) -> None:
        self._received = received
        self._rcpt_reply = rcpt_reply

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self._rcpt_reply is not None:
            return self._rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._received.append(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=envelope.original_content or b"",
                tls=session.ssl is not None,
            )
        )
        return "250 2.6.0 Queued mail for delivery"

    async def handle_exception(self, error: Exception) -> str:
        # A client that rejects a certificate aborts the handshake; for the
        # cert peers that is the point, not a server error worth a traceback.
        if isinstance(error, TLSSetupException):
            log.info("lab peer: TLS handshake failed: %r", error.__cause__)
        else:
            log.error("lab peer: session error", exc_info=error)
        return "451 4.3.0 Error in processing"


class _NoStartTlsSMTP(SMTP):
    """ESMTP without the STARTTLS extension at all (aiosmtpd would say 454)."""

    async def smtp_STARTTLS(self, arg: str) -> None:
        await self.push(STARTTLS_502_REPLY)


class EsmtpServer(FaultServer):
    """GOOD, NO_STARTTLS, CERT_*, RCPT_*: a real ESMTP server (aiosmtpd) in this event loop."""

    def __init__(
        self, fault: Fault, *, host: str, port: int, tls_context: ssl.SSLContext | None
    ) -> None:
        super().__init__(fault, host=host, port=port)
        self._tls_context = tls_context
        self._handler = _Handler(self.received, rcpt_reply=_RCPT_REPLIES.get(fault))
        self._server: asyncio.Server | None = None
        # Open sessions, so stop() can close them instead of leaving them to
        # aiosmtpd's 5-minute idle timeout; weak so finished ones just vanish.
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_session, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.close()
            await self._server.wait_closed()
            self._server = None

    def _new_session(self) -> SMTP:
        protocol = _NoStartTlsSMTP if self._tls_context is None else SMTP
        session = protocol(
            self._handler,
            hostname=self.name,
            ident="ESMTP mailflow-relay lab peer",
            tls_context=self._tls_context,
            loop=asyncio.get_running_loop(),
        )
        self._sessions.add(session)
        return session


def make_server(
    fault: Fault, *, host: str, port: int, ca: LabCA, untrusted_ca: LabCA
) -> FaultServer:
    """The endpoint for one fault; `ca` is the trusted lab CA, `untrusted_ca` one nobody trusts."""
    if fault is Fault.REFUSED:
        return ClosedPort(host=host, port=port)
    if fault is Fault.TIMEOUT:
        return BlackHole(host=host, port=port)
    if fault in ScriptedSmtp.MODES:
        return ScriptedSmtp(fault, host=host, port=port)
    return EsmtpServer(
        fault, host=host, port=port, tls_context=_tls_context(fault, ca, untrusted_ca)
    )


def _tls_context(fault: Fault, ca: LabCA, untrusted_ca: LabCA) -> ssl.SSLContext | None:
    name = lab_name(fault)
    if fault is Fault.NO_STARTTLS:
        return None
    if fault is Fault.CERT_EXPIRED:
        return ca.server_context(name, expired=True)
    if fault is Fault.CERT_WRONG_NAME:
        return ca.server_context(WRONG_NAME)
    if fault is Fault.CERT_UNTRUSTED:
        return untrusted_ca.server_context(name)
    return ca.server_context(name)


def lab_zone(host: str) -> dict[str, dict[str, list[str]]]:
    """Every fault's name points at `host`; `lab.test` has an MX to the good peer."""
    rdtype = "AAAA" if ipaddress.ip_address(host).version == 6 else "A"
    zone: dict[str, dict[str, list[str]]] = {lab_name(f): {rdtype: [host]} for f in Fault}
    zone[LAB_DOMAIN] = {"MX": [f"10 {lab_name(Fault.GOOD)}"]}
    return zone


@dataclass
class FaultLab:
    """Everything `relay lab faults` starts: the peers, their DNS, the CA file to trust."""

    servers: dict[Fault, FaultServer]
    dns: LabDnsServer
    ca_file: Path

    async def stop(self) -> None:
        await self.dns.stop()
        for server in self.servers.values():
            await server.stop()

    def smart_host(self, mode: Fault | DnsFault) -> str:
        """`name:port` for a connector; DNS faults never get as far as the port."""
        port = self.servers[mode].port if isinstance(mode, Fault) else 25
        return endpoint(lab_name(mode), port)

    def connector_blocks(self) -> str:
        """Ready-to-paste relay config: `[dns]` and one `[[connectors]]` per mode."""
        blocks = [
            "# mailflow-relay lab: paste into the relay config.",
            "[dns]",
            f"nameservers = [{_toml_str(self.dns.nameserver)}]",
            'timeout = "2s"',
        ]
        for mode in [*Fault, *DnsFault]:
            blocks += ["", *self._connector_block(mode)]
        return "\n".join(blocks) + "\n"

    def _connector_block(self, mode: Fault | DnsFault) -> list[str]:
        tls, tls_domain = _TLS_POLICY.get(mode, ("opportunistic", ""))
        return [
            f"# expect: {_EXPECT[mode][1]}",
            "[[connectors]]",
            f"name = {_toml_str(f'Lab {mode}')}",
            'type = "partner"',
            f"recipient_domains = [{_toml_str(lab_name(mode))}]",
            f"smart_hosts = [{_toml_str(self.smart_host(mode))}]",
            "use_mx = false",
            f"tls = {_toml_str(tls)}",
            f"tls_domain = {_toml_str(tls_domain)}",
            f"ca_file = {_toml_str(str(self.ca_file))}",
            'connect_timeout = "5s"',
            "enabled = true",
        ]

    def summary(self) -> list[str]:
        """One line per endpoint: mode, name, address, expected outcome."""
        lines: list[str] = []
        for mode in [*Fault, *DnsFault]:
            if isinstance(mode, Fault):
                server = self.servers[mode]
                where = endpoint(server.host, server.port)
            else:
                where = f"(DNS fault via {self.dns.nameserver})"
            lines.append(f"{mode:<16} {lab_name(mode):<25} {where:<32} {_EXPECT[mode][1]}")
        return lines


def _toml_str(value: str) -> str:
    """A TOML basic string: escape the backslash, the quote and control characters."""
    out = []
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def lab_ports(base_port: int | None) -> tuple[list[int], int]:
    """Endpoint ports in Fault order, then the DNS port (all 0 without a base)."""
    if base_port is None:
        return [0] * len(Fault), 0
    last = base_port + len(Fault)
    if base_port < 1 or last > 65535:
        raise LabOptionError(
            f"--base-port {base_port}: the lab needs ports {base_port}..{last}; "
            f"choose a base between 1 and {65535 - len(Fault)}"
        )
    return [base_port + i for i in range(len(Fault))], last


async def start_lab(
    *, host: str = "127.0.0.1", base_port: int | None = None, workdir: Path
) -> FaultLab:
    """Start every fault peer and the lab DNS; the lab CA's PEM is written into `workdir`."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise LabOptionError(
            f"--host {host!r}: the lab needs an IP address (its DNS answers with it), "
            "e.g. 127.0.0.1 or ::1"
        ) from None
    endpoint_ports, dns_port = lab_ports(base_port)
    ca = LabCA()
    untrusted_ca = LabCA(organization="mailflow-relay untrusted CA (not in the lab CA file)")
    ca_file = ca.write_ca_file(workdir)
    started: list[FaultServer] = []
    try:
        servers: dict[Fault, FaultServer] = {}
        for fault, port in zip(Fault, endpoint_ports, strict=True):
            server = make_server(fault, host=host, port=port, ca=ca, untrusted_ca=untrusted_ca)
            await server.start()
            started.append(server)
            servers[fault] = server
        dns = LabDnsServer(
            host=host,
            port=dns_port,
            zone=lab_zone(host),
            servfail=[lab_name(DnsFault.SERVFAIL)],
            silent=[lab_name(DnsFault.SILENT)],
        )
        await dns.start()
    except BaseException:
        for server in started:
            await server.stop()
        raise
    return FaultLab(servers=servers, dns=dns, ca_file=ca_file)


async def run_lab_forever(
    *,
    host: str = "127.0.0.1",
    base_port: int | None = None,
    workdir: Path,
    out: TextIO,
    on_ready: Callable[[FaultLab], None] | None = None,
    print_config: bool = True,
) -> None:
    """Start the lab, print its config and endpoints, and serve until cancelled (Ctrl-C).

    `on_ready` runs once everything listens (the CLI writes a relay config there). With
    `print_config` the output is the [dns] and [[connectors]] blocks to paste, the endpoints
    as comments; without (the config was written to a file), only the endpoints' table."""
    lab = await start_lab(host=host, base_port=base_port, workdir=workdir)
    try:
        if on_ready is not None:
            on_ready(lab)
        if print_config:
            out.write(lab.connector_blocks())
            out.write("\n# endpoints\n")
            for line in lab.summary():
                out.write(f"# {line}\n")
        else:
            out.write(f"{'MODE':<16} {'NAME':<25} {'ADDRESS':<32} EXPECT\n")
            for line in lab.summary():
                out.write(f"{line}\n")
        out.write("# lab running; press Ctrl-C to stop\n")
        out.flush()
        await asyncio.get_running_loop().create_future()  # never resolves: wait for cancel
    finally:
        await lab.stop()
