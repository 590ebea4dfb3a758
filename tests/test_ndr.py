"""Tests for relay.ndr: the RFC 3464 non-delivery report, parsed back with the email package."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage, Message

import pytest

from relay.codes import CONNECTION_REFUSED, DNS_QUERY_FAILED, QUEUE_EXPIRED_REPLY, led
from relay.ndr import Bounce, FailedRecipient, build_ndr, original_subject

NOW = datetime(2024, 5, 3, 10, 5, 0, tzinfo=UTC)
ARRIVED = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
MTA = "relay.lab.test"
POSTMASTER = "postmaster@contoso.onmicrosoft.com"

ORIGINAL = (
    b"From: Alice <alice@fabrikam.com>\r\n"
    b"To: bob@contoso.com\r\n"
    b"Subject: Quarterly report\r\n"
    b"Message-ID: <orig-1@fabrikam.com>\r\n"
    b"Date: Wed, 01 May 2024 10:00:00 +0000\r\n"
    b"\r\n"
    b"the body must not appear in the NDR\r\n"
)

REFUSED_LED = led(
    CONNECTION_REFUSED,
    reply="",
    message="Connection refused",
    server="mail.contoso.com",
    ip="192.0.2.10",
    port=25,
)


def refused(address: str = "bob@contoso.com") -> FailedRecipient:
    return FailedRecipient(
        address=address,
        reply=CONNECTION_REFUSED.expired_reply,
        remote_mta="mail.contoso.com",
        history=(
            (NOW - timedelta(hours=1), REFUSED_LED),
            (NOW - timedelta(minutes=5), REFUSED_LED),
        ),
    )


def rejected(address: str = "carol@contoso.com") -> FailedRecipient:
    return FailedRecipient(
        address=address,
        reply="550 5.1.1 <carol@contoso.com>: Recipient address rejected: User unknown",
        remote_mta="mail.contoso.com",
        history=(),
    )


def bounce(*recipients: FailedRecipient, **changes: object) -> Bounce:
    fields: dict[str, object] = {
        "original_headers": ORIGINAL,
        "original_mail_from": "alice@fabrikam.com",
        "arrival_date": ARRIVED,
        "received_from_mta": "client.fabrikam.com",
        "recipients": recipients or (refused(),),
    }
    fields.update(changes)
    return Bounce(**fields)  # type: ignore[arg-type]


def build(b: Bounce, now: datetime = NOW) -> bytes:
    raw = build_ndr(b, reporting_mta=MTA, postmaster=POSTMASTER, now=now)
    assert raw is not None
    return raw


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [part for part in payload if isinstance(part, Message)]


def status_blocks(msg: EmailMessage) -> list[Message]:
    status = parts(msg)[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    assert all(isinstance(block, Message) for block in blocks)
    return [block for block in blocks if isinstance(block, Message)]


def human_text(msg: EmailMessage) -> str:
    part = parts(msg)[0]
    assert isinstance(part, EmailMessage)
    text = part.get_content()
    assert isinstance(text, str)
    return text


def test_top_level_headers() -> None:
    msg = parse(build(bounce()))
    assert msg["From"] == POSTMASTER
    assert msg["To"] == "alice@fabrikam.com"
    assert msg["Subject"] == "Undeliverable: Quarterly report"
    assert msg["Date"].datetime == NOW
    assert msg["Message-ID"].endswith(f"@{MTA}>")
    assert msg["Message-ID"].startswith("<")
    assert msg["In-Reply-To"] == "<orig-1@fabrikam.com>"
    assert msg["References"] == "<orig-1@fabrikam.com>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert "X-MS-Exchange-Message-Is-Ndr" in msg
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"


def test_wire_format_is_crlf_and_short_lines() -> None:
    raw = build(bounce(refused(), rejected()))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert raw.isascii()


def test_three_parts_in_order() -> None:
    msg = parse(build(bounce()))
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_per_message_fields() -> None:
    per_message = status_blocks(parse(build(bounce())))[0]
    assert per_message["Reporting-MTA"] == f"dns;{MTA}"
    assert per_message["Received-From-MTA"] == "dns;client.fabrikam.com"
    assert per_message["Arrival-Date"] == "Wed, 01 May 2024 10:00:00 +0000"


def test_received_from_mta_is_left_out_when_unknown() -> None:
    per_message = status_blocks(parse(build(bounce(received_from_mta=None))))[0]
    assert "Received-From-MTA" not in per_message
    assert per_message["Reporting-MTA"] == f"dns;{MTA}"


def test_expiry_after_connection_refused() -> None:
    blocks = status_blocks(parse(build(bounce())))
    assert len(blocks) == 2
    rcpt = blocks[1]
    assert rcpt["Final-Recipient"] == "rfc822;bob@contoso.com"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.4.316"
    assert rcpt["Diagnostic-Code"] == "smtp;550 5.4.316 Message expired, connection refused"
    assert rcpt["Remote-MTA"] == "dns;mail.contoso.com"


def test_remote_rejection_keeps_reply_verbatim() -> None:
    msg = parse(build(bounce(rejected())))
    rcpt = status_blocks(msg)[1]
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Diagnostic-Code"] == (
        "smtp;550 5.1.1 <carol@contoso.com>: Recipient address rejected: User unknown"
    )
    text = human_text(msg)
    assert "The destination server rejected your message" in text
    assert "Recipient address rejected: User unknown" in text


def test_reply_without_enhanced_code_gets_class_status() -> None:
    plain = FailedRecipient("dave@contoso.com", "550 User unknown", None, ())
    rcpt = status_blocks(parse(build(bounce(plain))))[1]
    assert rcpt["Status"] == "5.0.0"
    assert rcpt["Diagnostic-Code"] == "smtp;550 User unknown"
    assert "Remote-MTA" not in rcpt


def test_two_recipients_give_two_groups() -> None:
    blocks = status_blocks(parse(build(bounce(refused(), rejected()))))
    assert len(blocks) == 3
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822;bob@contoso.com",
        "rfc822;carol@contoso.com",
    ]
    assert [b["Status"] for b in blocks[1:]] == ["5.4.316", "5.1.1"]


def test_blank_line_separates_the_status_groups() -> None:
    raw = build(bounce(refused(), rejected()))
    assert b"+0000\r\n\r\nFinal-Recipient: rfc822;bob@contoso.com\r\n" in raw
    assert b"\r\n\r\nFinal-Recipient: rfc822;carol@contoso.com\r\n" in raw


def test_human_part_layout() -> None:
    text = human_text(parse(build(bounce(refused(), rejected()))))
    assert text.startswith("Delivery has failed to these recipients or groups:")
    diagnostics = text.index("Diagnostic information for administrators:")
    assert text.index("bob@contoso.com") < diagnostics
    assert text.index("carol@contoso.com") < diagnostics
    assert f"Generating server: {MTA}" in text[diagnostics:]
    assert (
        "Remote server returned '550 5.4.316 Message expired, connection refused'"
        in text[diagnostics:]
    )
    assert f"2024-05-03 09:05:00Z {REFUSED_LED}" in text
    assert f"2024-05-03 10:00:00Z {REFUSED_LED}" in text
    assert text.index("09:05:00Z") < text.index("10:00:00Z")  # oldest first
    assert "Original message headers" not in text


def test_human_part_explains_with_the_code() -> None:
    text = human_text(parse(build(bounce())))
    assert CONNECTION_REFUSED.title.lower() in text
    assert CONNECTION_REFUSED.how_to_fix in text


def test_queue_expired_after_other_code() -> None:
    other = FailedRecipient(
        "erin@contoso.com",
        QUEUE_EXPIRED_REPLY,
        "mail.contoso.com",
        ((NOW, "452 4.3.1 Insufficient system storage [LastAttemptedServerName=x]"),),
    )
    msg = parse(build(bounce(other)))
    rcpt = status_blocks(msg)[1]
    assert rcpt["Status"] == "4.4.7"
    assert rcpt["Diagnostic-Code"] == "smtp;550 4.4.7 QUEUE.Expired; message expired"
    text = human_text(msg)
    assert "expired" in text
    assert "452 4.3.1 Insufficient system storage" in text
    assert "destination server" in text


def test_dns_failure_expiry() -> None:
    dns = FailedRecipient("bob@contoso.com", DNS_QUERY_FAILED.expired_reply, None, ())
    rcpt = status_blocks(parse(build(bounce(dns))))[1]
    assert rcpt["Status"] == "5.4.312"
    assert rcpt["Diagnostic-Code"] == "smtp;550 5.4.312 Message expired, DNS query failed"


def test_original_headers_part_has_headers_only() -> None:
    headers = parts(parse(build(bounce())))[2]
    assert isinstance(headers, EmailMessage)
    text = headers.get_content()
    assert "Message-ID: <orig-1@fabrikam.com>" in text
    assert "Subject: Quarterly report" in text
    assert "body must not appear" not in text


def test_null_sender_is_never_bounced() -> None:
    assert (
        build_ndr(bounce(original_mail_from=""), reporting_mta=MTA, postmaster=POSTMASTER, now=NOW)
        is None
    )


def test_no_recipients_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one failed recipient"):
        build_ndr(
            Bounce(ORIGINAL, "alice@fabrikam.com", ARRIVED, None, ()),
            reporting_mta=MTA,
            postmaster=POSTMASTER,
            now=NOW,
        )


def test_non_ascii_subject_round_trips() -> None:
    original = b"Subject: =?utf-8?b?UmVwb3J0IGbDvHIgTcOkcno=?=\r\nMessage-ID: <u@f>\r\n\r\n"
    raw = build(bounce(original_headers=original))
    assert raw.isascii()
    assert parse(raw)["Subject"] == "Undeliverable: Report für März"


def test_raw_utf8_headers_from_an_smtputf8_client() -> None:
    original = "Subject: Grüße aus Köln\r\nFrom: jörg@fabrikam.com\r\n\r\n".encode()
    msg = parse(build(bounce(original_headers=original)))
    assert msg["Subject"] == "Undeliverable: Grüße aus Köln"
    headers = parts(msg)[2]
    assert isinstance(headers, EmailMessage)
    assert "From: jörg@fabrikam.com" in headers.get_content()
    assert "In-Reply-To" not in msg


def test_non_ascii_addresses_do_not_crash() -> None:
    rcpt = FailedRecipient("björn@bücher.example", CONNECTION_REFUSED.expired_reply, None, ())
    raw = build(bounce(rcpt, original_mail_from="jörg@fabrikam.com"))
    msg = parse(raw)
    assert msg["To"] == "jörg@fabrikam.com"
    assert b"To: j\xc3\xb6rg@fabrikam.com\r\n" in raw  # RFC 6532 UTF-8, not RFC 2047
    block = status_blocks(msg)[1]
    # RFC 6533 section 3: the 7-bit form of the "utf-8" address type.
    assert block["Final-Recipient"] == "utf-8;bj\\x{F6}rn@b\\x{FC}cher.example"
    assert "björn@bücher.example" in human_text(msg)


def test_missing_subject_and_message_id() -> None:
    msg = parse(build(bounce(original_headers=b"From: alice@fabrikam.com\r\n\r\n")))
    assert msg["Subject"] == "Undeliverable:"
    assert "In-Reply-To" not in msg
    assert "References" not in msg


def test_same_input_gives_same_bytes_and_new_time_a_new_id() -> None:
    first = build(bounce())
    assert build(bounce()) == first
    later = parse(build(bounce(), now=NOW + timedelta(seconds=1)))
    assert later["Message-ID"] != parse(first)["Message-ID"]


def test_naive_and_offset_times_are_written_in_utc() -> None:
    naive = NOW.replace(tzinfo=None)
    msg = parse(build(bounce(arrival_date=ARRIVED.astimezone(timezone(timedelta(hours=2)))), naive))
    assert msg["Date"].datetime == NOW
    assert status_blocks(msg)[0]["Arrival-Date"] == "Wed, 01 May 2024 10:00:00 +0000"


@pytest.mark.parametrize(
    ("headers", "subject"),
    [
        (b"Subject: Hello\r\n\r\n", "Hello"),
        (b"Subject: =?iso-8859-1?q?Gr=FC=DFe?=\r\n\r\n", "Grüße"),
        (b"Subject: folded\r\n  over two lines\r\n\r\n", "folded over two lines"),
        (b"From: a@b\nSubject: LF only\n\nSubject: in the body\n", "LF only"),
        (b"From: a@b\r\n\r\nSubject: in the body\r\n", ""),
        (b"", ""),
    ],
)
def test_original_subject(headers: bytes, subject: str) -> None:
    assert original_subject(headers) == subject


def test_long_diagnostic_code_is_folded_and_reads_back_whole() -> None:
    reply = "550 5.7.1 " + "policy " * 30 + "end"
    raw = build(bounce(FailedRecipient("x@contoso.com", reply, None, ())))
    assert b"Diagnostic-Code: smtp;550 5.7.1 policy" in raw  # folded after, not before
    status = raw[raw.index(b"Diagnostic-Code:") :].split(b"\r\n\r\n")[0]
    assert len(status.split(b"\r\n")) == 4
    assert all(len(line) <= 78 for line in status.split(b"\r\n"))
    assert status_blocks(parse(raw))[1]["Diagnostic-Code"] == f"smtp;{reply}"
