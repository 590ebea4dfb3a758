"""Tests for relay.lab: each fault peer misbehaves exactly as intended, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import ssl
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from relay.config import parse_config
from relay.lab.certs import LabCA
from relay.lab.dns import LabDnsServer
from relay.lab.faults import (
    EXPECTED,
    GREETING_421_REPLY,
    RCPT_451_REPLY,
    RCPT_550_REPLY,
    DnsFault,
    Fault,
    FaultServer,
    Received,
    lab_name,
    lab_ports,
    make_server,
    run_lab_forever,
    start_lab,
)

pytestmark = pytest.mark.timeout(15)

HOST = "127.0.0.1"
MESSAGE = b"Subject: lab\r\n\r\nhello from the lab\r\n"

# OpenSSL's X509_V_ERR_* codes: the reason each cert peer must fail for.
CERT_HAS_EXPIRED = 10
UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
HOSTNAME_MISMATCH = 62


@dataclass(frozen=True)
class CAs:
    trusted: LabCA
    untrusted: LabCA
    ca_file: Path

    def verifying_context(self) -> ssl.SSLContext:
        """What a relay with `ca_file` and certificate checks would use."""
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> CAs:
    trusted = LabCA()
    ca_file = trusted.write_ca_file(tmp_path_factory.mktemp("ca"))
    return CAs(trusted=trusted, untrusted=LabCA(organization="other CA"), ca_file=ca_file)


@contextlib.asynccontextmanager
async def running(fault: Fault, cas: CAs) -> AsyncIterator[FaultServer]:
    server = make_server(fault, host=HOST, port=0, ca=cas.trusted, untrusted_ca=cas.untrusted)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def smtp_client(server: FaultServer) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(hostname=server.host, port=server.port, start_tls=False, timeout=3)


# --- connection-level faults -------------------------------------------------


async def test_refused_port_answers_with_rst(cas: CAs) -> None:
    async with running(Fault.REFUSED, cas) as server:
        assert server.port != 0
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(server.host, server.port)


async def test_timeout_port_never_completes_a_connect(cas: CAs) -> None:
    async with running(Fault.TIMEOUT, cas) as server:
        for _ in range(2):  # a second try must hang too: nothing ever drains the queue
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.open_connection(server.host, server.port), 0.5)


async def test_greeting_421_refuses_service_and_closes(cas: CAs) -> None:
    async with running(Fault.GREETING_421, cas) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            assert await reader.readline() == GREETING_421_REPLY.encode() + b"\r\n"
            assert await asyncio.wait_for(reader.read(), 2) == b""
        finally:
            writer.close()


async def test_greeting_421_as_seen_by_an_smtp_client(cas: CAs) -> None:
    async with running(Fault.GREETING_421, cas) as server:
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as caught:
            await smtp_client(server).connect()
        assert caught.value.code == 421
        assert "4.3.2" in caught.value.message


async def test_no_starttls_hides_the_extension_and_rejects_the_command(cas: CAs) -> None:
    async with running(Fault.NO_STARTTLS, cas) as server:
        client = smtp_client(server)
        await client.connect()
        try:
            await client.ehlo()
            assert not client.supports_extension("starttls")
            reply = await client.execute_command(b"STARTTLS")
            assert (reply.code, reply.message) == (502, "5.5.1 Command not implemented")
            await client.sendmail("a@contoso.test", ["b@no-starttls.lab.test"], MESSAGE)
        finally:
            client.close()
        assert server.received[0].tls is False


async def test_drop_after_ehlo_closes_at_the_next_command(cas: CAs) -> None:
    async with running(Fault.DROP_AFTER_EHLO, cas) as server:
        client = smtp_client(server)
        await client.connect()
        reply = await client.ehlo()
        assert reply.code == 250
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await client.mail("a@contoso.test")


async def test_drop_in_data_closes_after_354_without_a_final_reply(cas: CAs) -> None:
    async with running(Fault.DROP_IN_DATA, cas) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:

            async def say(line: bytes) -> bytes:
                writer.write(line + b"\r\n")
                await writer.drain()
                return await asyncio.wait_for(reader.readline(), 2)

            assert (await reader.readline()).startswith(b"220 ")
            writer.write(b"EHLO client.test\r\n")
            while not (await reader.readline()).startswith(b"250 "):
                pass  # the multi-line EHLO reply
            assert (await say(b"MAIL FROM:<a@contoso.test>")).startswith(b"250")
            assert (await say(b"RCPT TO:<b@drop-in-data.lab.test>")).startswith(b"250")
            assert (await say(b"DATA")).startswith(b"354")
            assert await say(MESSAGE + b".") == b""  # EOF instead of 250
        finally:
            writer.close()
        assert server.received == []


async def test_drop_in_data_as_seen_by_an_smtp_client(cas: CAs) -> None:
    async with running(Fault.DROP_IN_DATA, cas) as server:
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await aiosmtplib.send(
                MESSAGE,
                sender="a@contoso.test",
                recipients=["b@drop-in-data.lab.test"],
                hostname=server.host,
                port=server.port,
                start_tls=False,
                timeout=3,
            )


# --- TLS faults ----------------------------------------------------------------


async def starttls_error(server: FaultServer, context: ssl.SSLContext) -> ssl.SSLError | None:
    """STARTTLS to the peer by its lab name; the verification error, or None if it verified."""
    client = smtp_client(server)
    await client.connect()
    try:
        await client.starttls(server_hostname=server.name, tls_context=context)
    except ssl.SSLError as error:
        return error
    finally:
        client.close()
    return None


@pytest.mark.parametrize(
    ("fault", "verify_code"),
    [
        (Fault.CERT_EXPIRED, CERT_HAS_EXPIRED),
        (Fault.CERT_WRONG_NAME, HOSTNAME_MISMATCH),
        (Fault.CERT_UNTRUSTED, UNABLE_TO_GET_ISSUER_CERT_LOCALLY),
    ],
)
async def test_cert_peers_fail_verification_for_their_reason(
    cas: CAs, fault: Fault, verify_code: int
) -> None:
    async with running(fault, cas) as server:
        error = await starttls_error(server, cas.verifying_context())
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert error.verify_code == verify_code, error.verify_message


async def test_cert_wrong_name_is_otherwise_valid(cas: CAs) -> None:
    """Only the name is wrong: without the name check the chain and dates verify."""
    context = cas.verifying_context()
    context.check_hostname = False
    async with running(Fault.CERT_WRONG_NAME, cas) as server:
        assert await starttls_error(server, context) is None


async def test_cert_peers_still_take_mail_without_verification(cas: CAs) -> None:
    """Opportunistic TLS (no checks) gets through: the fault is only the certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    async with running(Fault.CERT_EXPIRED, cas) as server:
        client = smtp_client(server)
        await client.connect()
        try:
            await client.starttls(tls_context=context)
            await client.sendmail("a@contoso.test", ["b@cert-expired.lab.test"], MESSAGE)
        finally:
            client.close()
        assert server.received[0].tls is True


async def test_good_peer_verifies_and_records_the_message(cas: CAs) -> None:
    async with running(Fault.GOOD, cas) as server:
        client = smtp_client(server)
        await client.connect()
        try:
            await client.ehlo()
            assert client.supports_extension("starttls")
            await client.starttls(server_hostname=server.name, tls_context=cas.verifying_context())
            errors, reply = await client.sendmail(
                "a@contoso.test", ["b@good.lab.test", "c@good.lab.test"], MESSAGE
            )
        finally:
            client.close()
        assert errors == {}
        assert reply.startswith("2.6.0")
        assert server.received == [
            Received(
                mail_from="a@contoso.test",
                rcpt_tos=("b@good.lab.test", "c@good.lab.test"),
                data=MESSAGE,
                tls=True,
            )
        ]


# --- recipient faults ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "reply"), [(Fault.RCPT_451, RCPT_451_REPLY), (Fault.RCPT_550, RCPT_550_REPLY)]
)
async def test_rcpt_peers_refuse_every_recipient(cas: CAs, fault: Fault, reply: str) -> None:
    code, message = reply.split(" ", 1)
    async with running(fault, cas) as server:
        client = smtp_client(server)
        await client.connect()
        try:
            await client.ehlo()
            await client.mail("a@contoso.test")
            for recipient in ("b@rcpt.lab.test", "c@rcpt.lab.test"):
                with pytest.raises(aiosmtplib.SMTPRecipientRefused) as caught:
                    await client.rcpt(recipient)
                assert (caught.value.code, caught.value.message) == (int(code), message)
        finally:
            client.close()
        assert server.received == []


# --- DNS -----------------------------------------------------------------------

ZONE = {
    "mail.good.lab.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
    "Good.Lab.Test.": {"MX": ["10 mail.good.lab.test"]},
    "alias.lab.test": {"CNAME": ["mail.good.lab.test"]},
}

Query = Callable[[dns.message.Message, str, float, int], Awaitable[dns.message.Message]]


async def _udp(
    q: dns.message.Message, where: str, seconds: float, port: int
) -> dns.message.Message:
    return await dns.asyncquery.udp(q, where, timeout=seconds, port=port)


async def _tcp(
    q: dns.message.Message, where: str, seconds: float, port: int
) -> dns.message.Message:
    return await dns.asyncquery.tcp(q, where, timeout=seconds, port=port)


@pytest.fixture(params=[_udp, _tcp], ids=["udp", "tcp"])
def query(request: pytest.FixtureRequest) -> Query:
    transport: Query = request.param
    return transport


@pytest.fixture
async def dns_server() -> AsyncIterator[LabDnsServer]:
    server = LabDnsServer(zone=ZONE, servfail=["servfail.lab.test"], silent=["SILENT.lab.test."])
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def ask(
    query: Query, server: LabDnsServer, name: str, rdtype: str, seconds: float = 2
) -> dns.message.Message:
    return await query(dns.message.make_query(name, rdtype), server.host, seconds, server.port)


async def test_dns_answers_a_and_mx(query: Query, dns_server: LabDnsServer) -> None:
    a = await ask(query, dns_server, "MAIL.good.lab.test", "A")
    assert a.rcode() == dns.rcode.NOERROR
    assert a.flags & dns.flags.AA
    assert [r.to_text() for r in a.answer[0]] == ["127.0.0.1"]
    mx = await ask(query, dns_server, "good.lab.test", "MX")
    assert [r.to_text() for r in mx.answer[0]] == ["10 mail.good.lab.test."]


async def test_dns_follows_a_cname(query: Query, dns_server: LabDnsServer) -> None:
    reply = await ask(query, dns_server, "alias.lab.test", "AAAA")
    types = [rrset.rdtype for rrset in reply.answer]
    assert types == [dns.rdatatype.CNAME, dns.rdatatype.AAAA]


async def test_dns_nodata_carries_the_soa(query: Query, dns_server: LabDnsServer) -> None:
    reply = await ask(query, dns_server, "good.lab.test", "A")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer == []
    assert reply.authority[0].rdtype == dns.rdatatype.SOA


async def test_dns_nxdomain_is_authoritative(query: Query, dns_server: LabDnsServer) -> None:
    reply = await ask(query, dns_server, "nxdomain.lab.test", "A")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.flags & dns.flags.AA


async def test_dns_servfail(query: Query, dns_server: LabDnsServer) -> None:
    reply = await ask(query, dns_server, "Servfail.lab.test", "A")
    assert reply.rcode() == dns.rcode.SERVFAIL


async def test_dns_silent_name_times_out(query: Query, dns_server: LabDnsServer) -> None:
    with pytest.raises(dns.exception.Timeout):
        await ask(query, dns_server, "silent.lab.test", "A", seconds=0.3)
    # The server is still alive for the next question (on TCP: same server, new connection).
    assert (await ask(query, dns_server, "mail.good.lab.test", "A")).answer


async def test_dns_through_dnspythons_resolver(dns_server: LabDnsServer) -> None:
    """The way the relay will ask: a resolver configured with the lab's nameserver only."""
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns_server.host]
    resolver.port = dns_server.port
    resolver.lifetime = 0.5
    answer = await resolver.resolve("good.lab.test", "MX")
    assert str(answer[0].exchange) == "mail.good.lab.test."
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("nxdomain.lab.test", "A")
    with pytest.raises(dns.resolver.NoNameservers):
        await resolver.resolve("servfail.lab.test", "A")
    with pytest.raises(dns.resolver.LifetimeTimeout):
        await resolver.resolve("silent.lab.test", "A")


def test_dns_rejects_a_bad_zone_at_construction() -> None:
    with pytest.raises(dns.exception.SyntaxError):
        LabDnsServer(zone={"x.lab.test": {"A": ["not-an-address"]}})


# --- the whole lab -------------------------------------------------------------

CONNECTOR_KEYS = {
    "name",
    "type",
    "recipient_domains",
    "smart_hosts",
    "use_mx",
    "tls",
    "tls_domain",
    "ca_file",
    "connect_timeout",
    "enabled",
}
ACCEPTED_DOMAIN = '[[accepted_domains]]\nname = "contoso.test"\ntype = "authoritative"\n'


async def test_start_lab_serves_every_fault_and_its_dns(tmp_path: Path) -> None:
    lab = await start_lab(workdir=tmp_path)
    try:
        assert set(lab.servers) == set(Fault)
        ports = [server.port for server in lab.servers.values()] + [lab.dns.port]
        assert 0 not in ports
        assert len(set(ports)) == len(ports)
        assert lab.ca_file.read_text().startswith("-----BEGIN CERTIFICATE-----")

        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [lab.dns.host]
        resolver.port = lab.dns.port
        resolver.lifetime = 0.5
        for fault in Fault:
            answer = await resolver.resolve(lab_name(fault), "A")
            assert [r.address for r in answer] == [HOST]
        with pytest.raises(dns.resolver.NXDOMAIN):
            await resolver.resolve(lab_name(DnsFault.NXDOMAIN), "A")
        with pytest.raises(dns.resolver.NoNameservers):
            await resolver.resolve(lab_name(DnsFault.SERVFAIL), "A")
        with pytest.raises(dns.resolver.LifetimeTimeout):
            await resolver.resolve(lab_name(DnsFault.SILENT), "A")

        good = lab.servers[Fault.GOOD]
        await aiosmtplib.send(
            MESSAGE,
            sender="a@contoso.test",
            recipients=["b@good.lab.test"],
            hostname=good.host,
            port=good.port,
            tls_context=ssl.create_default_context(cafile=str(lab.ca_file)),
            start_tls=False,
            timeout=3,
        )
        assert good.received[0].data == MESSAGE
    finally:
        await lab.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(good.host, good.port)


async def test_connector_blocks_are_the_relays_config(tmp_path: Path) -> None:
    lab = await start_lab(workdir=tmp_path)
    try:
        text = lab.connector_blocks()
    finally:
        await lab.stop()
    config = tomllib.loads(text)
    assert config["dns"] == {"nameservers": [lab.dns.nameserver], "timeout": "2s"}
    connectors = config["connectors"]
    assert [c["name"] for c in connectors] == [f"Lab {mode}" for mode in EXPECTED]
    for connector in connectors:
        assert set(connector) == CONNECTOR_KEYS
        assert connector["ca_file"] == str(lab.ca_file)
        assert len(connector["name"]) <= 64
    by_mode = {c["name"].removeprefix("Lab "): c for c in connectors}
    assert by_mode["good"]["smart_hosts"] == [f"good.lab.test:{lab.servers[Fault.GOOD].port}"]
    assert by_mode["no-starttls"]["tls"] == "encryption_only"
    assert by_mode["cert-wrong-name"]["tls"] == "domain_validation"
    assert by_mode["cert-wrong-name"]["tls_domain"] == "cert-wrong-name.lab.test"
    assert by_mode["nxdomain"]["smart_hosts"] == ["nxdomain.lab.test:25"]
    # Each block carries its expectation as a comment right above it.
    assert "# expect: 450 4.4.316 Connection refused\n[[connectors]]" in text
    # The relay's own config loader accepts the blocks as they are.
    parse_config(text + "\n" + ACCEPTED_DOMAIN, source="lab", base_dir=tmp_path)


def test_expected_codes_cover_every_mode() -> None:
    assert set(EXPECTED) == {str(m) for m in Fault} | {str(m) for m in DnsFault}
    assert EXPECTED["good"] == ""
    assert EXPECTED["refused"] == "4.4.316"
    assert EXPECTED["timeout"] == "4.4.315"
    assert EXPECTED["nxdomain"] == EXPECTED["servfail"] == EXPECTED["silent"] == "4.4.312"
    assert EXPECTED["cert-untrusted"] == "4.7.320"
    assert EXPECTED["rcpt-550"] == "5.1.1"


def test_base_port_lays_out_ports_in_enum_order() -> None:
    endpoints, dns_port = lab_ports(40000)
    assert endpoints == [40000 + i for i in range(len(Fault))]
    assert dns_port == 40000 + len(Fault)
    assert lab_ports(None) == ([0] * len(Fault), 0)
    with pytest.raises(ValueError, match="base-port"):
        lab_ports(65530)


async def test_start_lab_wants_an_ip_address(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="IP address"):
        await start_lab(host="localhost", workdir=tmp_path)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# Outside CI a machine without ::1 skips this loudly; in CI (CI=true) it runs and fails.
@pytest.mark.skipif(
    not _ipv6_loopback() and os.environ.get("CI") != "true",
    reason="no IPv6 loopback on this machine; CI would FAIL here",
)
async def test_lab_on_ipv6_loopback(tmp_path: Path) -> None:
    lab = await start_lab(host="::1", workdir=tmp_path)
    try:
        assert lab.dns.nameserver == f"[::1]:{lab.dns.port}"
        reply = await dns.asyncquery.udp(
            dns.message.make_query("good.lab.test", "AAAA"), "::1", timeout=2, port=lab.dns.port
        )
        assert [r.to_text() for r in reply.answer[0]] == ["::1"]
        refused = lab.servers[Fault.REFUSED]
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("::1", refused.port)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                asyncio.open_connection("::1", lab.servers[Fault.TIMEOUT].port), 0.5
            )
    finally:
        await lab.stop()


async def test_run_lab_forever_prints_config_and_stops_on_cancel(tmp_path: Path) -> None:
    out = io.StringIO()
    task = asyncio.create_task(run_lab_forever(host=HOST, workdir=tmp_path, out=out))
    for _ in range(100):
        if "lab running" in out.getvalue():
            break
        await asyncio.sleep(0.05)
    text = out.getvalue()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    config = tomllib.loads(text)  # the summary lines are comments: all of it pastes
    good_port = int(config["connectors"][0]["smart_hosts"][0].rsplit(":", 1)[1])
    assert "good.lab.test" in text
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, good_port)
