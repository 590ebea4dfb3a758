"""Tests for relay.codes: the mail flow intelligence table and its string helpers."""

from __future__ import annotations

import pytest

from relay import codes
from relay.codes import (
    CANNOT_CONNECT,
    CERTIFICATE_VALIDATION_FAILED,
    CLOSED_ABRUPTLY,
    CODES,
    CONNECTION_REFUSED,
    CONNECTION_TIMED_OUT,
    DNS_QUERY_FAILED,
    QUEUE_EXPIRED_REPLY,
    expired_code,
    expired_reply,
    led,
    lookup,
    status_of,
)

# code, title, reply, expired reply: protocol facts from Exchange Online.
TABLE = [
    (
        "4.4.312",
        "DNS query failed",
        "450 4.4.312 DNS query failed",
        "550 5.4.312 Message expired, DNS query failed",
    ),
    (
        "4.4.315",
        "Connection timed out",
        "450 4.4.315 Connection timed out",
        "550 5.4.315 Message expired, connection timed out",
    ),
    (
        "4.4.316",
        "Connection refused",
        "450 4.4.316 Connection refused",
        "550 5.4.316 Message expired, connection refused",
    ),
    (
        "4.4.317",
        "Cannot connect to remote server",
        "450 4.4.317 Cannot connect to remote server",
        "550 5.4.317 Message expired, cannot connect to remote server",
    ),
    (
        "4.4.318",
        "Connection was closed abruptly",
        "450 4.4.318 Connection was closed abruptly",
        "550 5.4.318 Message expired, connection was closed abruptly",
    ),
    (
        "4.7.320",
        "Certificate validation failed",
        "450 4.7.320 Certificate validation failed",
        "550 5.7.320 Message expired, certificate validation failed",
    ),
]


@pytest.mark.parametrize(("code", "title", "reply", "expired"), TABLE)
def test_table_strings_are_exact(code: str, title: str, reply: str, expired: str) -> None:
    entry = CODES[code]
    assert (entry.code, entry.title, entry.reply, entry.expired_reply) == (
        code,
        title,
        reply,
        expired,
    )
    assert lookup(code) is entry
    assert expired_reply(code) == expired


def test_constants_are_the_table() -> None:
    assert list(CODES.values()) == [
        DNS_QUERY_FAILED,
        CONNECTION_TIMED_OUT,
        CONNECTION_REFUSED,
        CANNOT_CONNECT,
        CLOSED_ABRUPTLY,
        CERTIFICATE_VALIDATION_FAILED,
    ]


@pytest.mark.parametrize("entry", list(CODES.values()), ids=list(CODES))
def test_guidance_is_present_and_mentions_partners(entry: codes.MailFlowCode) -> None:
    assert entry.causes
    assert all(cause.endswith(".") for cause in entry.causes)
    assert "partner organization" in entry.how_to_fix
    assert "contact the partner" in entry.how_to_fix


def test_connection_refused_guidance_covers_firewall_and_fix_now() -> None:
    fix = CONNECTION_REFUSED.how_to_fix
    assert "firewall" in fix
    assert "TCP port 25" in fix
    assert "Fix now" in fix
    assert "authoritative" in fix
    assert "disable the connector" in fix


def test_other_how_to_fix_names_the_destination_server() -> None:
    assert "destination server" in codes.OTHER_HOW_TO_FIX
    assert "contact the partner" in codes.OTHER_HOW_TO_FIX


def test_lookup_unknown_code() -> None:
    assert lookup("4.7.1") is None
    assert lookup(" 4.4.316 ") is CONNECTION_REFUSED


@pytest.mark.parametrize("last", [None, "4.7.1", "5.1.1", "", "garbage"])
def test_expired_reply_after_other_codes(last: str | None) -> None:
    assert expired_reply(last) == QUEUE_EXPIRED_REPLY == "550 4.4.7 QUEUE.Expired; message expired"


def test_expired_code_maps_expiry_lines_back() -> None:
    for entry in CODES.values():
        assert expired_code(entry.expired_reply) is entry
    assert expired_code(QUEUE_EXPIRED_REPLY) is None
    assert expired_code("550 5.1.1 User unknown") is None
    assert expired_code("450 4.4.316 Connection refused") is None


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        ("550 5.4.316 Message expired, connection refused", "5.4.316"),
        ("550 5.7.320 Message expired, certificate validation failed", "5.7.320"),
        ("450 4.4.316 Connection refused", "4.4.316"),
        ("550 4.4.7 QUEUE.Expired; message expired", "4.4.7"),  # as Exchange reports it
        ("550-5.1.1 The email account does not exist", "5.1.1"),  # continuation line
        ("550 User unknown", "5.0.0"),
        ("421 Service not available", "4.0.0"),
        ("451 4.3.0", "4.3.0"),
        ("250 OK", "2.0.0"),
        ("554", "5.0.0"),
        ("550 5.4.316, trailing comma is not a code", "5.0.0"),
        ("not a reply", "5.0.0"),
        ("", "5.0.0"),
    ],
)
def test_status_of(reply: str, status: str) -> None:
    assert status_of(reply) == status


def test_led_full() -> None:
    line = led(
        CONNECTION_REFUSED,
        reply="ignored",
        message="Connection refused",
        server="mail.contoso.com",
        ip="192.0.2.10",
        port=25,
    )
    assert line == (
        "450 4.4.316 Connection refused [Message=Connection refused] "
        "[LastAttemptedServerName=mail.contoso.com] [LastAttemptedIP=192.0.2.10:25]"
    )


def test_led_dns_failure_has_no_ip() -> None:
    line = led(
        DNS_QUERY_FAILED,
        reply="",
        message="NXDOMAIN",
        server="smtp.contoso.com",
        ip=None,
        port=None,
    )
    assert line == (
        "450 4.4.312 DNS query failed [Message=NXDOMAIN] [LastAttemptedServerName=smtp.contoso.com]"
    )


def test_led_without_server() -> None:
    line = led(
        CONNECTION_TIMED_OUT, reply="", message="timed out", server=None, ip="192.0.2.1", port=2525
    )
    assert line == (
        "450 4.4.315 Connection timed out [Message=timed out] [LastAttemptedIP=192.0.2.1:2525]"
    )


def test_led_ipv6_is_bracketed() -> None:
    line = led(
        CLOSED_ABRUPTLY, reply="", message="EOF", server="mx.contoso.com", ip="2001:db8::1", port=25
    )
    assert line.endswith("[LastAttemptedIP=[2001:db8::1]:25]")
    assert led(CLOSED_ABRUPTLY, reply="", message="", server=None, ip="::1", port=None) == (
        "450 4.4.318 Connection was closed abruptly [LastAttemptedIP=::1]"
    )


def test_led_other_code_starts_with_remote_reply() -> None:
    line = led(
        None,
        reply="452 4.3.1 Insufficient system storage",
        message="452 4.3.1 Insufficient system storage",
        server="mail.contoso.com",
        ip="192.0.2.10",
        port=25,
    )
    assert line.startswith("452 4.3.1 Insufficient system storage [Message=452 4.3.1")
    assert line.endswith("[LastAttemptedIP=192.0.2.10:25]")


def test_led_starttls_required_detail() -> None:
    # The 4.4.317 case seen in real Exchange traffic.
    line = led(
        CANNOT_CONNECT,
        reply="451 5.7.3 STARTTLS is required to send mail",
        message="451 5.7.3 STARTTLS is required to send mail",
        server="mail.contoso.com",
        ip="192.0.2.10",
        port=25,
    )
    assert line.startswith(
        "450 4.4.317 Cannot connect to remote server "
        "[Message=451 5.7.3 STARTTLS is required to send mail]"
    )


def test_led_is_one_line() -> None:
    line = led(
        None,
        reply="421-4.7.0 first\r\n421 4.7.0 second",
        message="multi\r\nline",
        server=None,
        ip=None,
        port=None,
    )
    assert line == "421-4.7.0 first 421 4.7.0 second [Message=multi line]"
