"""The resolver against a real DNS server on loopback (the lab's LabDnsServer)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from relay.classify import Failure
from relay.lab.dns import LabDnsServer
from relay.resolve import DnsError, Resolver

pytestmark = pytest.mark.timeout(15)

ZONE = {
    "v4.lab.test": {"A": ["127.0.0.1", "127.0.0.2"]},
    "v6.lab.test": {"AAAA": ["::1"]},
    "dual.lab.test": {"A": ["127.0.0.3"], "AAAA": ["::3"]},
    "mx.lab.test": {"MX": ["20 second.lab.test", "10 first.lab.test", "30 third.lab.test"]},
    "nomx.lab.test": {"A": ["127.0.0.4"]},
    "nullmx.lab.test": {"MX": ["0 ."]},
    "alias.lab.test": {"CNAME": ["v4.lab.test"]},
}


@pytest.fixture
async def dns_server() -> AsyncIterator[LabDnsServer]:
    server = LabDnsServer(
        host="127.0.0.1",
        port=0,
        zone=ZONE,
        servfail=["servfail.lab.test"],
        silent=["silent.lab.test"],
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def resolver(dns_server: LabDnsServer) -> Resolver:
    return Resolver(nameservers=[dns_server.nameserver], timeout=0.5)


async def test_a_records(resolver: Resolver) -> None:
    assert sorted(await resolver.addresses("v4.lab.test")) == ["127.0.0.1", "127.0.0.2"]


async def test_aaaa_records(resolver: Resolver) -> None:
    assert await resolver.addresses("v6.lab.test") == ["::1"]


async def test_ipv4_comes_before_ipv6(resolver: Resolver) -> None:
    assert await resolver.addresses("dual.lab.test") == ["127.0.0.3", "::3"]


async def test_a_cname_is_followed(resolver: Resolver) -> None:
    assert sorted(await resolver.addresses("alias.lab.test")) == ["127.0.0.1", "127.0.0.2"]


async def test_names_are_case_insensitive_and_may_end_with_a_dot(resolver: Resolver) -> None:
    assert await resolver.addresses("V6.Lab.Test.") == ["::1"]


@pytest.mark.parametrize("literal", ["127.0.0.9", "::1", "2001:db8::25"])
async def test_an_ip_literal_is_its_own_answer(resolver: Resolver, literal: str) -> None:
    assert await resolver.addresses(literal) == [literal]


async def test_an_ip_literal_needs_no_dns_at_all() -> None:
    # A nameserver that does not exist: any query would time out.
    resolver = Resolver(nameservers=["127.0.0.1:9"], timeout=0.2)
    assert await resolver.addresses("192.0.2.1") == ["192.0.2.1"]


async def test_mx_hosts_come_in_preference_order(resolver: Resolver) -> None:
    assert await resolver.mx("mx.lab.test") == [
        "first.lab.test",
        "second.lab.test",
        "third.lab.test",
    ]


async def test_a_domain_without_mx_is_its_own_mail_host(resolver: Resolver) -> None:
    """RFC 5321 section 5.1: no MX, so the domain's own A/AAAA (the implicit MX)."""
    assert await resolver.mx("nomx.lab.test") == ["nomx.lab.test"]


async def test_a_null_mx_accepts_no_mail(resolver: Resolver) -> None:
    with pytest.raises(DnsError) as caught:
        await resolver.mx("nullmx.lab.test")
    assert caught.value.failure is Failure.DNS_NO_ANSWER


@pytest.mark.parametrize(
    ("name", "failure"),
    [
        ("nosuch.lab.test", Failure.DNS_NXDOMAIN),
        ("servfail.lab.test", Failure.DNS_SERVFAIL),
        ("silent.lab.test", Failure.DNS_TIMEOUT),
        ("mx.lab.test", Failure.DNS_NO_ANSWER),  # exists, but has only MX records
    ],
)
async def test_address_failures(resolver: Resolver, name: str, failure: Failure) -> None:
    with pytest.raises(DnsError) as caught:
        await resolver.addresses(name)
    assert caught.value.failure is failure
    assert caught.value.name == name
    assert name in str(caught.value)


@pytest.mark.parametrize(
    ("domain", "failure"),
    [
        ("nosuch.lab.test", Failure.DNS_NXDOMAIN),
        ("servfail.lab.test", Failure.DNS_SERVFAIL),
        ("silent.lab.test", Failure.DNS_TIMEOUT),
    ],
)
async def test_mx_failures(resolver: Resolver, domain: str, failure: Failure) -> None:
    with pytest.raises(DnsError) as caught:
        await resolver.mx(domain)
    assert caught.value.failure is failure
    assert caught.value.name == domain


async def test_a_dead_nameserver_is_a_dns_timeout() -> None:
    resolver = Resolver(nameservers=["127.0.0.1:9"], timeout=0.3)
    with pytest.raises(DnsError) as caught:
        await resolver.addresses("v4.lab.test")
    assert caught.value.failure in (Failure.DNS_TIMEOUT, Failure.DNS_SERVFAIL)


@pytest.mark.parametrize("lookup", ["addresses", "mx"])
async def test_a_lookup_that_timed_out_is_a_timeout_error(resolver: Resolver, lookup: str) -> None:
    """As aiosmtplib's errors do, the timeout is also the built-in it resembles."""
    with pytest.raises(TimeoutError) as caught:
        await getattr(resolver, lookup)("silent.lab.test")
    assert isinstance(caught.value, DnsError)
    assert caught.value.failure is Failure.DNS_TIMEOUT


async def test_other_lookup_failures_are_no_timeout(resolver: Resolver) -> None:
    with pytest.raises(DnsError) as caught:
        await resolver.addresses("nosuch.lab.test")
    assert not isinstance(caught.value, TimeoutError)
