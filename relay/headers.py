"""Header fields: the few the relay reads from a message and the ones it writes itself.

Dates (RFC 5322 section 3.3), the Received: trace field (RFC 5321 section 4.4), and the
Message-ID, Date and Subject intake reads or adds. Pure functions of the text and the
time they are given; nothing here knows about SMTP sessions or the queue.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.utils import format_datetime, make_msgid
from typing import Any

from relay.text import UNSAFE, printable

# How much of the content is searched for the header fields intake reads (Message-ID, Date,
# Subject): the header block, or this much of a message that has no body. Decoding a whole
# 35 MB header-only message to text cost more memory than the message itself.
HEAD_SCAN_LIMIT = 1 << 20

_WANTED = frozenset({"message-id", "date", "subject"})
_LINE_SPACE = re.compile("[\t\r\n\x0b\x0c\x1c-\x1f\x85\u2028\u2029]")


def rfc5322_date(timestamp: float) -> str:
    """ "Fri, 27 Nov 2026 05:26:32 +0000": UTC written as +0000, not the "unknown" -0000."""
    return _date_of_second(int(timestamp))


@functools.lru_cache(maxsize=8)
def _date_of_second(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))


def received_header(
    *,
    helo: str,
    ip: str,
    by: str,
    protocol: str,
    queue_id: int,
    recipient: str | None,
    now: float,
) -> bytes:
    """The trace field RFC 5321 section 4.4 asks every relay to prepend:
    "Received: from <helo> ([<ip>]) by <by> with <protocol> id <queue_id>", then
    "for <recipient>" (only for a message to one recipient) and the date."""
    line = f"Received: from {printable(helo)} ([{ip}]) by {by} with {protocol} id {queue_id}"
    if recipient:
        line += f"\r\n\tfor <{printable(recipient)}>"
    line += f"; {rfc5322_date(now)}\r\n"
    return line.encode("utf-8")


def with_protocol(*, extended: bool, tls: bool, utf8: bool) -> str:
    """The Received: field's "with" keyword (RFC 3848): SMTP, ESMTP, ESMTPS, and with
    SMTPUTF8 UTF8SMTP or UTF8SMTPS (RFC 6531 section 4.3)."""
    protocol = "ESMTP" if extended else "SMTP"
    if tls:
        protocol += "S"
    if utf8:
        protocol = "UTF8" + protocol.removeprefix("E")
    return protocol


def complete_headers(
    raw: bytes | bytearray, *, now: float, hostname: str
) -> tuple[bytes, str, str]:
    """Headers to add (Message-ID, Date when missing, RFC 5322 section 3.6), the Message-ID,
    and the decoded subject as the queue keeps it."""
    end = raw.find(b"\r\n\r\n", 0, HEAD_SCAN_LIMIT)
    head = raw[:HEAD_SCAN_LIMIT] if end < 0 else raw[: end + 2]
    # RFC 6532 allows raw UTF-8 in headers (SMTPUTF8); decode it as such, not as Latin-1.
    fields = header_fields(head.decode("utf-8", errors="replace"), _WANTED)
    added = b""
    message_id = fields.get("message-id", "").strip()
    if not message_id:
        message_id = make_msgid(domain=hostname)
        added += f"Message-ID: {message_id}\r\n".encode()
    if "date" not in fields:
        added += f"Date: {rfc5322_date(now)}\r\n".encode()
    return added, message_id, _storable(decoded_subject(fields.get("subject")))


def _storable(subject: str) -> str:
    """The subject as the queue keeps it (listed by `relay queue list`, on a terminal):
    whitespace controls as spaces, other control characters and undecodable bytes as "?"
    (an RFC 2047 encoded word can carry any of them)."""
    return printable(_LINE_SPACE.sub(" ", subject)) if UNSAFE.search(subject) else subject


def header_fields(head: str, names: frozenset[str]) -> dict[str, str]:
    """The first occurrence of each named header field, unfolded (RFC 5322 section 2.2.3).

    A plain scan instead of the email package's parser, which cost more than the rest of
    the intake's header work together.
    """
    fields: dict[str, str] = {}
    current = ""
    for line in head.splitlines():
        if line[:1] in (" ", "\t"):
            if current:
                fields[current] += line
            continue
        name, colon, value = line.partition(":")
        key = name.strip().lower()
        current = key if colon and key in names and key not in fields else ""
        if current:
            fields[current] = value.strip()
    return fields


def decoded_subject(value: Any) -> str:
    if value is None:
        return ""
    if "=?" not in str(value):  # no RFC 2047 encoded words: nothing to decode
        return str(value)
    try:
        return str(make_header(decode_header(str(value)))).replace("\r\n", "").replace("\n", "")
    except (ValueError, LookupError, UnicodeError):
        return str(value)


def own_received_header(*, hostname: str, via: str, queue_id: int, now: float) -> bytes:
    """The Received: field of a message the relay writes itself (an NDR), RFC 5321 4.4."""
    return f"Received: from localhost by {hostname} ({via}) id {queue_id}; {rfc5322_date(now)}\r\n".encode()


def message_id_of(content: bytes) -> str:
    """The Message-ID header of a message we built ("" when it has none)."""
    for line in content.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode("ascii", "replace")
    return ""
