"""relay.headers: the header fields the relay reads and writes, as pure functions."""

from __future__ import annotations

import pytest

from relay.headers import (
    complete_headers,
    decoded_subject,
    header_fields,
    received_header,
    rfc5322_date,
    with_protocol,
)

NOW = 1_800_000_000.0  # Fri, 15 Jan 2027 08:00:00 +0000


def test_rfc5322_date_writes_utc_as_plus_0000() -> None:
    assert rfc5322_date(NOW) == "Fri, 15 Jan 2027 08:00:00 +0000"


@pytest.mark.parametrize(
    ("extended", "tls", "utf8", "keyword"),
    [
        (False, False, False, "SMTP"),
        (True, False, False, "ESMTP"),
        (True, True, False, "ESMTPS"),
        (True, False, True, "UTF8SMTP"),  # RFC 6531 section 4.3
        (True, True, True, "UTF8SMTPS"),
    ],
)
def test_with_protocol(extended: bool, tls: bool, utf8: bool, keyword: str) -> None:
    assert with_protocol(extended=extended, tls=tls, utf8=utf8) == keyword


def test_received_header_for_one_recipient() -> None:
    header = received_header(
        helo="client.fabrikam.test",
        ip="192.0.2.7",
        by="relay.contoso.test",
        protocol="ESMTPS",
        queue_id=42,
        recipient="alice@contoso.test",
        now=NOW,
    )
    assert header == (
        b"Received: from client.fabrikam.test ([192.0.2.7]) by relay.contoso.test with ESMTPS"
        b" id 42\r\n\tfor <alice@contoso.test>; Fri, 15 Jan 2027 08:00:00 +0000\r\n"
    )


def test_received_header_names_no_recipient_of_several_and_nothing_unsafe() -> None:
    header = received_header(
        helo="bad\r\nname",
        ip="::1",
        by="relay.contoso.test",
        protocol="SMTP",
        queue_id=7,
        recipient=None,
        now=NOW,
    )
    assert header.count(b"\r\n") == 1 and header.endswith(b"+0000\r\n")
    assert b"for <" not in header and b"([::1])" in header


def test_complete_headers_adds_what_is_missing() -> None:
    added, message_id, subject = complete_headers(
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\nbody\r\n", now=NOW, hostname="relay.contoso.test"
    )
    assert message_id.startswith("<") and message_id.endswith("@relay.contoso.test>")
    assert added == (
        f"Message-ID: {message_id}\r\nDate: Fri, 15 Jan 2027 08:00:00 +0000\r\n".encode()
    )
    assert subject == "café"


def test_complete_headers_keeps_what_is_there() -> None:
    raw = b"Message-ID: <a@b>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n"
    assert complete_headers(raw, now=NOW, hostname="relay.contoso.test") == (b"", "<a@b>", "")


def test_header_fields_unfolds_and_keeps_the_first() -> None:
    head = "Subject: one\r\n two\r\nSubject: second\r\nX-Other: x\r\n"
    assert header_fields(head, frozenset({"subject"})) == {"subject": "one two"}


def test_decoded_subject_leaves_what_it_cannot_decode() -> None:
    assert decoded_subject(None) == ""
    assert decoded_subject("=?x-unknown?q?abc?=") == "=?x-unknown?q?abc?="
