"""Name resolution for delivery: smart hosts and MX hosts to addresses, failures as values.

With `[dns].nameservers` set, every lookup goes to those servers through dnspython's asyncio
resolver. Without, host names go through the system resolver (so /etc/hosts works, as for
Postfix) and MX lookups through dnspython's system configuration.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from relay.classify import Failure
from relay.errors import DnsError, DnsTimeout
from relay.net import split_host_port

# DnsError lives with the other errors; delivery catches it from here.
__all__ = ["DnsError", "DnsTimeout", "Resolver", "is_ip"]


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Resolver:
    def __init__(self, *, nameservers: list[str], timeout: float) -> None:
        self._timeout = timeout
        self._system = not nameservers
        resolver = dns.asyncresolver.Resolver(configure=self._system)
        if nameservers:
            servers: list[dns.nameserver.Nameserver] = []
            for text in nameservers:
                host, port = split_host_port(text, default_port=53)
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            resolver.nameservers = servers
        resolver.timeout = timeout
        resolver.lifetime = timeout
        self._dns = resolver

    async def addresses(self, name: str) -> list[str]:
        """IPv4 then IPv6 addresses of a host name; an IP literal is its own answer."""
        if is_ip(name):
            return [name]
        if self._system:
            return await self._system_addresses(name)
        results = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True
        )
        found = [ip for r in results if isinstance(r, list) for ip in r]
        if found:
            return found
        errors = [r for r in results if isinstance(r, DnsError)]
        for failure in (Failure.DNS_TIMEOUT, Failure.DNS_SERVFAIL, Failure.DNS_NXDOMAIN):
            for error in errors:
                if error.failure is failure:
                    raise error
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, DnsError):
                raise r
        raise DnsError(Failure.DNS_NO_ANSWER, name, f"{name} has no A or AAAA record")

    async def mx(self, domain: str) -> list[str]:
        """MX host names by preference; [domain] itself when it has none (RFC 5321 5.1)."""
        try:
            answer = await self._dns.resolve(domain, "MX", search=False)
        except dns.resolver.NoAnswer:
            return [domain]
        except dns.exception.DNSException as exc:
            raise _dns_error(exc, domain, "MX") from None
        records = sorted(answer, key=lambda r: r.preference)
        hosts = [str(r.exchange).rstrip(".") for r in records]
        if hosts == [""]:  # RFC 7505 null MX: the domain accepts no mail
            raise DnsError(Failure.DNS_NO_ANSWER, domain, f"{domain} accepts no mail (null MX)")
        return hosts

    async def _query(self, name: str, rdtype: str) -> list[str]:
        try:
            answer = await self._dns.resolve(name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            return []
        except dns.exception.DNSException as exc:
            raise _dns_error(exc, name, rdtype) from None
        return [r.to_text() for r in answer]

    async def _system_addresses(self, name: str) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, None, type=socket.SOCK_STREAM), self._timeout
            )
        except TimeoutError:
            raise DnsTimeout(Failure.DNS_TIMEOUT, name, f"looking up {name} timed out") from None
        except socket.gaierror as exc:
            failure = {
                socket.EAI_NONAME: Failure.DNS_NXDOMAIN,
                socket.EAI_AGAIN: Failure.DNS_SERVFAIL,
            }.get(exc.errno or 0, Failure.DNS_NO_ANSWER)
            raise DnsError(failure, name, f"{name}: {exc.strerror}") from None
        ordered = sorted(infos, key=lambda i: 0 if i[0] == socket.AF_INET else 1)
        seen: list[str] = []
        for info in ordered:
            ip = str(info[4][0])
            if ip not in seen:
                seen.append(ip)
        return seen


def _dns_error(exc: dns.exception.DNSException, name: str, rdtype: str) -> DnsError:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return DnsError(Failure.DNS_NXDOMAIN, name, f"{name} does not exist (NXDOMAIN)")
    if isinstance(exc, dns.exception.Timeout):
        return DnsTimeout(Failure.DNS_TIMEOUT, name, f"the {rdtype} query for {name} timed out")
    if isinstance(exc, dns.resolver.NoNameservers):
        return DnsError(
            Failure.DNS_SERVFAIL, name, f"the {rdtype} query for {name} failed (SERVFAIL)"
        )
    return DnsError(Failure.DNS_SERVFAIL, name, f"the {rdtype} query for {name} failed: {exc}")
