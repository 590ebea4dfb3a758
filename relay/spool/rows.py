"""The spool's value types: what goes in (a new message), what comes out (rows, the
digest) and what the queue manager writes back (a recipient's `Result`).

"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.states import Change, Recipient, Status


@dataclass(frozen=True, slots=True)
class NewRecipient:
    address: str
    connector: str = ""


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message ready to queue; content is the full RFC 5322 message as it will be sent."""

    id: int
    message_id: str
    mail_from: str
    subject: str
    received_at: float
    expires_at: float
    client_address: str
    client_helo: str
    recipients: Sequence[NewRecipient]
    content: bytes


@dataclass(frozen=True, slots=True)
class LastError:
    code: str
    reply: str
    title: str
    server: str | None
    ip: str | None
    at: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "code": self.code,
                "reply": self.reply,
                "title": self.title,
                "server": self.server,
                "ip": self.ip,
                "at": self.at,
            }
        )

    @classmethod
    def from_json(cls, text: str | None) -> LastError | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Attempt:
    at: float
    code: str
    reply: str
    server: str | None
    ip: str | None


@dataclass(slots=True)
class RecipientRow:
    id: int
    message: int
    address: str
    status: Status
    connector: str
    attempts: int
    next_attempt_at: float | None
    expires_at: float
    delivered_at: float | None
    last_error: LastError | None
    ndr_due: bool = False
    history: list[Attempt] = field(default_factory=list)

    @property
    def state(self) -> Recipient:
        """What the state machine reads of it."""
        return Recipient(self.status, self.attempts, self.next_attempt_at, self.expires_at)


@dataclass(slots=True)
class MessageRow:
    id: int
    message_id: str
    mail_from: str
    subject: str
    size: int
    received_at: float
    client_address: str
    client_helo: str
    recipients: list[RecipientRow] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DigestRow:
    connector: str
    code: str | None
    messages: int
    recipients: int
    held: int
    deferred: int
    queue_started_at: float
    next_retry_at: float | None
    oldest_expires_at: float
    last_error: LastError | None


@dataclass(frozen=True, slots=True)
class Result:
    """One recipient's change, decided by `relay.states.step`, ready to be written.

    `was` is the state the change was decided from: the spool writes it only while the
    recipient is still in that state, so a hold, an expiry or a delete from the CLI while
    the attempt was in flight keeps what the CLI made of it.
    """

    recipient: int
    was: Status
    change: Change
    at: float
    connector: str
    error: LastError | None = None


@dataclass(frozen=True, slots=True)
class ListFilter:
    """Which messages `list_messages` returns: those with a recipient matching every
    recipient condition given (a status in `statuses`, `connector`, `recipient`), from
    `mail_from`. None is "any"; addresses compare without regard to case."""

    statuses: frozenset[Status] | None = None
    connector: str | None = None
    mail_from: str | None = None
    recipient: str | None = None
