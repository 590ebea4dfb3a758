"""Local delivery: one Maildir per mailbox at <[mailboxes].path>/<address>/ (mutt, Dovecot)."""

from __future__ import annotations

import mailbox
from pathlib import Path

from relay.text import printable


def maildir_path(root: Path, address: str) -> Path:
    return root / address.lower()


def deliver(root: Path, address: str, *, mail_from: str, content: bytes) -> str:
    """Add the message to the mailbox's Maildir (blocking: call it in a thread); returns its key.

    Like a local delivery agent, prepend Return-Path (RFC 5321 section 4.4) and Delivered-To.
    Maildir files use the local line ending. Intake refuses envelopes with control characters;
    should one still be queued (from before that check), it is written with "?" in their
    place (Postfix's printable()), never as a line break of its own.
    """
    trace = (
        f"Return-Path: <{printable(mail_from)}>\r\nDelivered-To: {printable(address)}\r\n"
    ).encode()
    path = maildir_path(root, address)
    path.parent.mkdir(parents=True, exist_ok=True)
    box = mailbox.Maildir(path, create=True)
    return box.add((trace + content).replace(b"\r\n", b"\n"))
