"""The Maildir delivery agent: one Maildir per mailbox at <[mailboxes].path>/<address>/
(mutt, Dovecot), behind the same protocol as the SMTP agent (`relay.agents.DeliveryAgent`).
"""

from __future__ import annotations

import asyncio
import logging
import mailbox
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from relay.agents import CACHE_TIME_LIMIT, Content, Delivered, Parcel, Results
from relay.classify import Failure, Stage, WireEvent
from relay.routing import Route
from relay.text import printable

# The logger these lines have always had (the worker wrote the mailboxes): log filters and
# readers of `relay serve`'s output see the same names as before.
log = logging.getLogger("relay.worker")


def maildir_path(root: Path, address: str) -> Path:
    return root / address.lower()


def write_message(root: Path, address: str, *, mail_from: str, content: bytes) -> str:
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


class MaildirAgent:
    """Writes each recipient's copy into the Maildir of its mailbox.

    `mailbox_for` maps a local address to the mailbox that gets its mail (postmaster's
    mailbox, say); it is asked at delivery time, so a changed policy applies at once.
    """

    def __init__(self, *, root: Path, mailbox_for: Callable[[str], str]) -> None:
        self._root = root
        self._mailbox_for = mailbox_for

    async def deliver(
        self, route: Route, parcels: Sequence[Parcel], content: Content
    ) -> AsyncIterator[tuple[Parcel, Results]]:
        """Write the parcels in order. A write that fails with OSError (disk full,
        permissions) fails that recipient for now (451 4.3.0, tried again later); any other
        exception ends the delivery at its parcel, for the queue manager to defer."""
        for parcel in parcels:
            data = await content(parcel.message)
            results: Results = {}
            for rid, address in parcel.recipients:
                mailbox = self._mailbox_for(address)
                try:
                    key = await asyncio.to_thread(
                        write_message,
                        self._root,
                        mailbox,
                        mail_from=parcel.mail_from,
                        content=data,
                    )
                    results[rid] = Delivered(f"delivered to maildir {mailbox} as {key}", "mailbox")
                except OSError as exc:
                    log.error("mailbox %s: %s", address, exc)
                    text = f"4.3.0 Could not write to the mailbox: {exc.strerror or exc}"
                    results[rid] = WireEvent(
                        Stage.DATA, Failure.REPLY, text, server="mailbox", code=451, reply=text
                    )
            yield parcel, results

    @property
    def has_idle(self) -> bool:
        return False  # nothing stays open between deliveries

    async def close_idle(self, *, older_than: float = CACHE_TIME_LIMIT) -> None:
        return None
