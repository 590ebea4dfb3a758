"""A small authoritative DNS server on loopback (UDP and TCP) for the lab's name faults."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Collection, Mapping, Sequence
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset

from relay.net import endpoint

Zone = Mapping[str, Mapping[str, Sequence[str]]]

_TTL = 60
_MAX_CNAME_CHAIN = 8
# Port 0 lets the OS pick the TCP port; the UDP socket must then get the same
# number, which another process may hold. A few retries make that race harmless.
_BIND_ATTEMPTS = 20


def _name(text: str) -> dns.name.Name:
    """Names are case-insensitive and the trailing dot is optional (dns.name compares folded)."""
    return dns.name.from_text(text.rstrip(".") + ".")


def _parse_zone(zone: Zone) -> dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]]:
    """Turn {"name": {"TYPE": ["rdata text", ...]}} into RRsets; bad records fail here, at start."""
    parsed: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
    for owner_text, records in zone.items():
        owner = _name(owner_text)
        by_type = parsed.setdefault(owner, {})
        for type_text, values in records.items():
            rdtype = dns.rdatatype.from_text(type_text)
            rrset = by_type.setdefault(rdtype, dns.rrset.RRset(owner, dns.rdataclass.IN, rdtype))
            for value in values:
                # Names inside rdata (MX exchange, CNAME target) are absolute even
                # without a trailing dot: a lab zone has no $ORIGIN to be relative to.
                rdata = dns.rdata.from_text(
                    dns.rdataclass.IN, rdtype, value, origin=dns.name.root, relativize=False
                )
                rrset.add(rdata, _TTL)
    return parsed


class LabDnsServer:
    """Answers from a fixed zone; some names SERVFAIL, some never answer at all.

    Anything not in the zone is NXDOMAIN with the authoritative flag, so a
    resolver treats it as a final answer (RFC 1035 section 4.1.1).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        zone: Zone,
        servfail: Collection[str] = (),
        silent: Collection[str] = (),
        origin: str = "lab.test",
    ) -> None:
        self.host = host
        self.port = port
        self._records = _parse_zone(zone)
        self._servfail = frozenset(_name(n) for n in servfail)
        self._silent = frozenset(_name(n) for n in silent)
        self._origin = _name(origin)
        self._soa = dns.rrset.from_text(
            self._origin,
            _TTL,
            "IN",
            "SOA",
            f"ns.{self._origin} hostmaster.{self._origin} 1 60 60 60 60",
        )
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        # Open TCP sessions, so stop() can close them and wait for their tasks.
        self._tcp_clients: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}

    @property
    def nameserver(self) -> str:
        """The server as the relay config writes it in `[dns].nameservers`."""
        return endpoint(self.host, self.port)

    async def start(self) -> None:
        """Bind TCP and UDP on one port (a fixed one, or one the OS picks)."""
        attempts = 1 if self.port else _BIND_ATTEMPTS
        for attempt in range(attempts):
            tcp = await asyncio.start_server(self._serve_tcp, self.host, self.port)
            port = tcp.sockets[0].getsockname()[1]
            try:
                await self._bind_udp(port)
            except OSError:
                tcp.close()
                if attempt == attempts - 1:
                    raise
                continue
            self._tcp, self.port = tcp, port
            return

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in self._tcp_clients:
                writer.close()
            await asyncio.gather(*self._tcp_clients.values(), return_exceptions=True)
            await self._tcp.wait_closed()
            self._tcp = None

    async def _bind_udp(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(self.host, port)
        )
        self._udp = transport

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """RFC 1035 section 4.2.2: each message is preceded by a two-byte length."""
        task = asyncio.current_task()
        assert task is not None
        self._tcp_clients[writer] = task
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = self.answer(await reader.readexactly(length))
                if reply is not None:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_clients.pop(writer, None)
            writer.close()

    def answer(self, wire: bytes) -> bytes | None:
        """The reply to one query in wire format, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not worth a FORMERR: nothing in the lab sends garbage on purpose
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            return self._error(query, dns.rcode.NOTIMP)
        question = query.question[0]
        if question.name in self._silent:
            return None
        if question.name in self._servfail:
            return self._error(query, dns.rcode.SERVFAIL)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        self._resolve(response, question.name, question.rdtype)
        return response.to_wire()

    def _resolve(
        self, response: dns.message.Message, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> None:
        """Fill the answer, following CNAMEs inside the zone (RFC 1034 section 4.3.2)."""
        for _ in range(_MAX_CNAME_CHAIN):
            records = self._records.get(name)
            if records is None:
                if not self._has_descendant(name):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                break  # an empty non-terminal exists: NODATA, not NXDOMAIN
            if rdtype in records:
                response.answer.append(records[rdtype])
                return
            cname = records.get(dns.rdatatype.CNAME)
            if cname is None:
                break
            response.answer.append(cname)
            name = cname[0].target
        if name.is_subdomain(self._origin):
            # The SOA lets resolvers cache the negative answer (RFC 2308).
            response.authority.append(self._soa)

    def _has_descendant(self, name: dns.name.Name) -> bool:
        return any(owner.is_subdomain(name) for owner in self._records)

    @staticmethod
    def _error(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        return response.to_wire()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: LabDnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector transport does not subclass DatagramTransport in 3.11.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self._server.answer(data)
        if reply is not None and self._transport is not None:
            with contextlib.suppress(OSError):
                self._transport.sendto(reply, addr)
