"""relay.net: the one way the relay writes and reads host:port (IPv6 in brackets)."""

from __future__ import annotations

import pytest

from relay.net import endpoint, split_host_port


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("192.0.2.1", 25, "192.0.2.1:25"),
        ("2001:db8::1", 25, "[2001:db8::1]:25"),
        ("::1", 2525, "[::1]:2525"),
        ("::ffff:192.0.2.1", 25, "[::ffff:192.0.2.1]:25"),  # IPv4-mapped is IPv6
        ("fe80::1%eth0", 25, "[fe80::1%eth0]:25"),  # with a zone (RFC 6874 writes %25)
        ("good.lab.test", 2600, "good.lab.test:2600"),
        ("192.0.2.1", None, "192.0.2.1"),  # no port: the address alone, unbracketed
        ("2001:db8::1", None, "2001:db8::1"),
    ],
)
def test_endpoint(host: str, port: int | None, text: str) -> None:
    assert endpoint(host, port) == text


@pytest.mark.parametrize(
    ("host", "port"), [("192.0.2.1", 25), ("2001:db8::1", 53), ("relay.contoso.test", 0)]
)
def test_split_host_port_reads_what_endpoint_writes(host: str, port: int) -> None:
    assert split_host_port(endpoint(host, port), default_port=None) == (host, port)


def test_split_host_port_defaults_the_port() -> None:
    assert split_host_port("[::1]", default_port=53) == ("::1", 53)
    assert split_host_port("smtp.fabrikam.test", default_port=25) == ("smtp.fabrikam.test", 25)


@pytest.mark.parametrize(
    ("text", "default_port", "says"),
    [
        ("::1:25", 25, "in brackets"),
        ("[::1", 25, r"as \[::1\]:25"),
        ("[::1]25", 25, r"as \[::1\]:25"),
        (":25", 25, "has no host"),
        ("127.0.0.1", None, "has no port"),
        ("127.0.0.1:65536", None, "0 to 65535"),
        ("127.0.0.1:smtp", None, "0 to 65535"),
    ],
)
def test_split_host_port_says_how_to_write_it(
    text: str, default_port: int | None, says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        split_host_port(text, default_port=default_port)
