"""Reading the local Maildirs (delivered lab mail, NDRs, alert mail) for `relay mailbox`.

Pure but for reading files: the Maildir agent writes them (relay/agents/maildir.py), this
only reads. A mailbox's messages are numbered 1, 2, ... oldest first, in the order the
agent delivered them (the time and counter in each Maildir file name, as `mailbox`'s
`Maildir.add` writes it), so a number stays the same while mail is added.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.clock import iso

# "<seconds>.M<microseconds>P<pid>Q<counter>.<host>", Python's Maildir.add (Maildir's
# "time.MusecPpid" convention, https://cr.yp.to/proto/maildir.html).
_KEY = re.compile(r"^(\d+)\.M(\d+)P\d+Q(\d+)\.")
# The RFC 3464 per-recipient fields `relay mailbox show` prints, in this order.
STATUS_FIELDS = ("Final-Recipient", "Action", "Status", "Diagnostic-Code", "Remote-MTA")


@dataclass(frozen=True, slots=True)
class MailboxEntry:
    """One message in a mailbox, as `relay mailbox list` shows it."""

    address: str
    n: int
    file: Path
    date: float | None
    mail_from: str
    subject: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "n": self.n,
            "file": str(self.file),
            "date": iso(self.date),
            "from": self.mail_from,
            "subject": self.subject,
            "size": self.size,
        }


@dataclass(frozen=True, slots=True)
class Rendered:
    """One message read for people: its header summary, text parts and, for an NDR or
    DSN, one mapping of delivery-status fields per recipient (None for other mail)."""

    entry: MailboxEntry
    to: str
    text: str
    delivery_status: list[dict[str, str]] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.entry.address,
            "n": self.entry.n,
            "date": iso(self.entry.date),
            "from": self.entry.mail_from,
            "to": self.to,
            "subject": self.entry.subject,
            "text": self.text,
            "delivery_status": (
                None
                if self.delivery_status is None
                else [{_json_key(k): v for k, v in block.items()} for block in self.delivery_status]
            ),
        }


def _json_key(field: str) -> str:
    return field.lower().replace("-", "_")


def addresses(root: Path) -> list[str]:
    """The mailboxes under the root (directories that are Maildirs), sorted."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "new").is_dir() and (p / "cur").is_dir())


def _files(box: Path) -> list[Path]:
    files = [f for sub in ("new", "cur") if (box / sub).is_dir() for f in (box / sub).iterdir()]
    return sorted((f for f in files if f.is_file()), key=_delivery_order)


def _delivery_order(file: Path) -> tuple[int, int, int, str]:
    match = _KEY.match(file.name)
    if match is None:  # a file put there by hand: by its modification time
        ns = file.stat().st_mtime_ns
        return (ns // 10**9, (ns // 1000) % 10**6, 0, file.name)
    return (int(match.group(1)), int(match.group(2)), int(match.group(3)), file.name)


def _parse(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def _date(message: email.message.EmailMessage, file: Path) -> float:
    try:
        parsed = email.utils.parsedate_to_datetime(str(message["Date"]))
    except (TypeError, ValueError):
        return file.stat().st_mtime
    return parsed.timestamp()


def _entry(address: str, n: int, file: Path) -> tuple[MailboxEntry, email.message.EmailMessage]:
    data = file.read_bytes()
    message = _parse(data)
    entry = MailboxEntry(
        address=address,
        n=n,
        file=file,
        date=_date(message, file),
        mail_from=str(message.get("From", "")),
        subject=str(message.get("Subject", "")),
        size=len(data),
    )
    return entry, message


def list_mailbox(root: Path, address: str) -> list[MailboxEntry]:
    """A mailbox's messages, oldest first, numbered from 1 ([] when it does not exist)."""
    box = root / address.lower()
    return [_entry(box.name, n, f)[0] for n, f in enumerate(_files(box), start=1)]


def message_file(root: Path, address: str, n: int) -> Path | None:
    """The file of message N in the mailbox, or None when there is no such message."""
    files = _files(root / address.lower())
    return files[n - 1] if 1 <= n <= len(files) else None


def render(root: Path, address: str, n: int) -> Rendered | None:
    """Message N of the mailbox read for people, or None when there is no such message."""
    file = message_file(root, address, n)
    if file is None:
        return None
    entry, message = _entry(address.lower(), n, file)
    return Rendered(
        entry=entry,
        to=str(message.get("To", "")),
        text=text_parts(message),
        delivery_status=delivery_status(message),
    )


def text_parts(message: email.message.EmailMessage) -> str:
    """The text/plain parts that are not attachments, decoded, one after the other."""
    texts: list[str] = []
    for part in message.walk():
        if not isinstance(part, email.message.EmailMessage) or part.is_multipart():
            continue
        if part.get_content_type() == "text/plain" and part.get_content_disposition() is None:
            texts.append(str(part.get_content()).rstrip())
    return "\n\n".join(t for t in texts if t)


def delivery_status(message: email.message.EmailMessage) -> list[dict[str, str]] | None:
    """For a `multipart/report; report-type=delivery-status` (RFC 6522, RFC 3464): the
    per-recipient fields of its message/delivery-status part; None for any other mail.

    The address and MTA type prefixes (`rfc822;`, `dns;`, `smtp;`) are left out: the
    relay writes only those, and people read the value after them."""
    if (
        message.get_content_type() != "multipart/report"
        or message.get_param("report-type") != "delivery-status"
    ):
        return None
    found: list[dict[str, str]] = []
    for part in message.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = part.get_payload()
        assert isinstance(blocks, list)
        for block in blocks[1:]:  # the first block is per message (Reporting-MTA, ...)
            assert isinstance(block, email.message.Message)
            found.append({f: _value(block.get(f)) for f in STATUS_FIELDS if block.get(f)})
    return found


def _value(raw: Any) -> str:
    text = " ".join(str(raw).split())
    kind, sep, rest = text.partition(";")
    return rest.strip() if sep and " " not in kind else text
