"""The non-delivery report: builds the RFC 3464 bounce message, pure (time and host passed in).

The shape follows Exchange Online's expiry NDR: a ``multipart/report;
report-type=delivery-status`` (RFC 6522) with a human-readable part, a
``message/delivery-status`` part (RFC 3464) and the original headers as
``text/rfc822-headers``.  The caller queues the bytes with envelope sender ``<>`` and
one recipient, the original envelope sender.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesHeaderParser
from email.policy import SMTP, SMTPUTF8, EmailPolicy, compat32
from email.policy import default as default_policy
from email.utils import format_datetime
from typing import TypeAlias

from relay.codes import OTHER_HOW_TO_FIX, expired_code, status_of

__all__ = ["Bounce", "FailedRecipient", "build_ndr", "original_subject"]

# EmailPolicy is generic only in the type stubs, so the alias must stay a string.
_Policy: TypeAlias = "EmailPolicy[EmailMessage]"


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient the relay gave up on, and why."""

    address: str
    reply: str
    """The final line, e.g. ``550 5.4.316 Message expired, connection refused``."""
    remote_mta: str | None
    """The destination server's name, when known."""
    history: tuple[tuple[datetime, str], ...]
    """(time, LED line) of the last attempts, oldest first; may be empty."""


@dataclass(frozen=True, slots=True)
class Bounce:
    """Everything an NDR says about one message."""

    original_headers: bytes
    original_mail_from: str
    """The envelope sender; the NDR goes there.  ``""`` is the null sender."""
    arrival_date: datetime
    received_from_mta: str | None
    """The client's HELO name or address."""
    recipients: tuple[FailedRecipient, ...]


def build_ndr(
    bounce: Bounce, *, reporting_mta: str, postmaster: str, now: datetime
) -> bytes | None:
    """Return the NDR for ``bounce`` as RFC 5322 bytes (CRLF), or None for a null sender.

    A bounce is never bounced (RFC 3464 section 2 / RFC 5321 section 4.5.5): an
    ``original_mail_from`` of ``""`` gives None.  ``postmaster`` is the full From address
    (``postmaster@<default domain>``).  Naive datetimes are taken as UTC.  The Message-ID
    and MIME boundary are derived from the inputs, so building the same bounce twice gives
    the same bytes (a retried enqueue does not create a second, different NDR).
    Raises ValueError when ``bounce.recipients`` is empty.
    """
    if not bounce.original_mail_from:
        return None
    if not bounce.recipients:
        raise ValueError("a bounce needs at least one failed recipient; got none")
    now = _utc(now)
    # RFC 6532: an internationalized address cannot be RFC 2047-encoded, so the headers go
    # out as UTF-8 and the NDR needs SMTPUTF8, as the original message did.
    ascii_only = bounce.original_mail_from.isascii() and postmaster.isascii()
    policy = SMTP if ascii_only else SMTPUTF8
    token = _token(bounce, reporting_mta=reporting_mta, now=now)

    msg = EmailMessage(policy=policy)
    msg["From"] = postmaster
    msg["To"] = bounce.original_mail_from
    msg["Subject"] = f"Undeliverable: {original_subject(bounce.original_headers)}".rstrip()
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = f"<{token}@{reporting_mta}>"
    original_id = _original_message_id(bounce.original_headers)
    if original_id is not None:
        msg["In-Reply-To"] = original_id
        msg["References"] = original_id
    # RFC 3834 section 5: an automatic response to a message.
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-MS-Exchange-Message-Is-Ndr"] = ""
    msg["MIME-Version"] = "1.0"
    parts: list[Message | str] = [
        _human_part(bounce, reporting_mta=reporting_mta, policy=policy),
        _status_part(bounce, reporting_mta=reporting_mta, policy=policy),
        _headers_part(bounce.original_headers, policy=policy),
    ]
    # RFC 6522 section 3: multipart/report with the report-type parameter.
    msg["Content-Type"] = f'multipart/report; report-type=delivery-status; boundary="=_ndr_{token}"'
    msg.set_payload(parts)
    return msg.as_bytes()


def original_subject(headers: bytes) -> str:
    """Return the decoded Subject (RFC 2047) of a header block, or ``""`` when missing."""
    value = _parse_headers(headers).get("Subject")
    return "" if value is None else " ".join(str(value).split())


# -- the parts ---------------------------------------------------------------------------


def _human_part(bounce: Bounce, *, reporting_mta: str, policy: _Policy) -> MIMEPart:
    lines = ["Delivery has failed to these recipients or groups:", ""]
    for rcpt in bounce.recipients:
        lines += [rcpt.address, *_explanation(rcpt), ""]
    lines += ["", "Diagnostic information for administrators:", ""]
    lines += [f"Generating server: {reporting_mta}", ""]
    for rcpt in bounce.recipients:
        lines += [rcpt.address, f"Remote server returned '{_one_line(rcpt.reply)}'"]
        if rcpt.remote_mta is not None:
            lines.append(f"Destination server: {rcpt.remote_mta}")
        if rcpt.history:
            lines.append("Last attempts (UTC):")
            lines += [f"{_utc(when):%Y-%m-%d %H:%M:%SZ} {entry}" for when, entry in rcpt.history]
        lines.append("")
    text = "\n".join(lines)
    part = MIMEPart(policy=policy)
    part.set_content(text, charset="utf-8", cte=_transfer_encoding(text))
    return part


def _explanation(rcpt: FailedRecipient) -> list[str]:
    """Why this recipient failed and what to do, in our words (Exchange's layout)."""
    reply = _one_line(rcpt.reply)
    code = expired_code(reply)
    if code is not None:
        return [
            "Your message couldn't be delivered before it expired. The relay kept retrying, "
            f"but the destination could not be reached: {code.title.lower()} "
            f"({code.reply}).",
            f"How to fix it: {code.how_to_fix}",
        ]
    last = f" The last error was: {rcpt.history[-1][1]}" if rcpt.history else ""
    if "QUEUE.Expired" in reply:
        return [
            f"Your message couldn't be delivered before it expired.{last}",
            f"How to fix it: {OTHER_HOW_TO_FIX}",
        ]
    if reply.startswith("5"):
        return [
            f"The destination server rejected your message with this reply: '{reply}'.",
            "Check the address for mistakes and send the message again. If the address is "
            "right, the recipient's mail administrator can tell you why it was refused.",
        ]
    return [
        f"The relay gave up delivering your message. The last reply was: '{reply}'.{last}",
        f"How to fix it: {OTHER_HOW_TO_FIX}",
    ]


def _status_part(bounce: Bounce, *, reporting_mta: str, policy: _Policy) -> MIMEPart:
    # RFC 3464 section 2.1: one per-message block, then one block per recipient, each a
    # header-like block separated by a blank line.  The email package represents this
    # as a list of header-only messages, and its generator writes the blank lines.
    blocks: list[Message | str] = [_per_message_fields(bounce, reporting_mta=reporting_mta)]
    blocks += [_per_recipient_fields(rcpt) for rcpt in bounce.recipients]
    part = MIMEPart(policy=policy)
    part["Content-Type"] = "message/delivery-status"
    part.set_payload(blocks)
    return part


def _per_message_fields(bounce: Bounce, *, reporting_mta: str) -> Message:
    # RFC 3464 sections 2.2.2 (Reporting-MTA), 2.2.4 (Received-From-MTA), 2.2.5
    # (Arrival-Date); mta-name-type "dns" as Exchange writes it.
    fields = [("Reporting-MTA", f"dns;{_xtext(reporting_mta)}")]
    if bounce.received_from_mta:
        fields.append(("Received-From-MTA", f"dns;{_xtext(bounce.received_from_mta)}"))
    fields.append(("Arrival-Date", format_datetime(_utc(bounce.arrival_date))))
    return _block(fields)


def _per_recipient_fields(rcpt: FailedRecipient) -> Message:
    # RFC 3464 sections 2.3.2 (Final-Recipient), 2.3.3 (Action), 2.3.4 (Status),
    # 2.3.5 (Remote-MTA), 2.3.6 (Diagnostic-Code).
    fields = [
        ("Final-Recipient", _address_field(rcpt.address)),
        ("Action", "failed"),
        ("Status", status_of(rcpt.reply)),
    ]
    if rcpt.remote_mta:
        fields.append(("Remote-MTA", f"dns;{_xtext(rcpt.remote_mta)}"))
    fields.append(("Diagnostic-Code", f"smtp;{_xtext(_one_line(rcpt.reply))}"))
    return _block(fields)


def _block(fields: Iterable[tuple[str, str]]) -> Message:
    # compat32 keeps the values exactly as folded here.  The email package's own folder
    # moves a long unstructured value whole onto a continuation line, which its parser
    # then reads back with a leading space (" smtp;550 ..."); folding at the last space
    # that fits (RFC 5322 section 2.2.3) reads back cleanly.
    block = Message(policy=compat32)
    for name, value in fields:
        block[name] = _fold(name, value)
    return block


def _fold(name: str, value: str, width: int = 78) -> str:
    words = value.split(" ")
    lines = [f"{name}: {words[0]}"]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) > width:
            lines.append(f" {word}")
        else:
            lines[-1] += f" {word}"
    return "\n".join(lines)[len(name) + 2 :]


def _headers_part(headers: bytes, *, policy: _Policy) -> MIMEPart:
    # RFC 6522 section 5: text/rfc822-headers.  Raw UTF-8 headers (RFC 6532) go out
    # quoted-printable so the part stays 7-bit; plain ASCII headers go out untouched.
    # Undecodable 8-bit bytes (never valid in a header) become U+FFFD.
    text = _header_block(headers).decode("utf-8", errors="replace")
    part = MIMEPart(policy=policy)
    part.set_content(text, subtype="rfc822-headers", charset="utf-8", cte=_transfer_encoding(text))
    return part


def _transfer_encoding(text: str) -> str:
    # 7bit needs ASCII lines of at most 998 octets (RFC 5321 section 4.5.3.1.6); LED lines
    # are long but well under that, so the usual all-ASCII NDR stays readable on the wire.
    longest = max((len(line) for line in text.splitlines()), default=0)
    return "7bit" if text.isascii() and longest <= 998 else "quoted-printable"


# -- helpers -----------------------------------------------------------------------------


def _header_block(raw: bytes) -> bytes:
    """The header block of ``raw`` without the blank line or any body, CRLF-terminated."""
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    kept: list[bytes] = []
    for line in lines:
        if not line.strip():
            break
        kept.append(line)
    return b"".join(line + b"\r\n" for line in kept)


def _parse_headers(raw: bytes) -> Message:
    return BytesHeaderParser(policy=default_policy).parsebytes(_header_block(raw) + b"\r\n")


_MSG_ID = re.compile(r"<[!-;=?-~]+>")


def _original_message_id(raw: bytes) -> str | None:
    value = _parse_headers(raw).get("Message-ID")
    match = _MSG_ID.search(str(value)) if value is not None else None
    return match.group(0) if match else None


def _address_field(address: str) -> str:
    # RFC 3464 section 2.3.2: "rfc822;" for ASCII addresses; RFC 6533 section 3 defines
    # the "utf-8" address type, whose 7-bit form escapes non-ASCII as \x{HEX}.
    if address.isascii():
        return f"rfc822;{address}"
    return f"utf-8;{_xtext(address)}"


def _xtext(text: str) -> str:
    # DSN fields are 7-bit (RFC 3464 section 2.1.1); RFC 6533 section 3's embedded
    # unicode escape keeps anything else readable without breaking the part.
    out = []
    for ch in text:
        if "!" <= ch <= "~" or ch == " ":
            out.append(ch)
        else:
            out.append(f"\\x{{{ord(ch):02X}}}")
    return "".join(out)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _token(bounce: Bounce, *, reporting_mta: str, now: datetime) -> str:
    """A stable unique-enough token for the Message-ID and boundary, from the inputs."""
    digest = hashlib.sha256()
    for piece in (repr(bounce), reporting_mta, now.isoformat()):
        digest.update(piece.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:32]
