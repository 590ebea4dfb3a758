"""Delivery agents: what the queue manager hands a route's mail to, behind one protocol.

An agent only delivers: it gets a route, the parcels for it in order and a way to read
their content, and yields each parcel with what happened to every recipient of it (a
`Delivered`, or None when the agent has nothing to say about it: delivered; else a
`WireEvent` for `relay.classify`). It decides nothing about retries,
expiry or NDRs; the queue manager does (Postfix's qmgr and its delivery agents). The
SMTP agent (`relay.agents.smtp`) serves connector and MX routes, the Maildir agent
(`relay.agents.maildir`) the local mailboxes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.classify import WireEvent
from relay.routing import Route

# Deliveries to one route at once (per connector, or MX domain): the queue manager runs
# at most this many, and an agent keeps at most this many idle connections for it.
CONNECTIONS_PER_ROUTE = 10
# Postfix's smtp_connection_cache_time_limit is 2 s: an idle connection is kept that long,
# and while an agent has one the queue manager calls `close_idle()` at least this often.
CACHE_TIME_LIMIT = 2.0


@dataclass(frozen=True, slots=True)
class Parcel:
    """One message for one destination: the recipients that share a transaction."""

    message: int
    mail_from: str
    recipients: tuple[tuple[int, str], ...]  # (recipient row id, address)


@dataclass(frozen=True, slots=True)
class Delivered:
    """A recipient the destination accepted, and how: its final reply (which carries the
    destination's own queue id), the server, its address and the TLS protocol (None: plain
    text). One value is shared by the recipients of a transaction."""

    reply: str
    server: str
    ip: str | None = None
    port: int | None = None
    tls: str | None = None


# Per recipient row id: Delivered (or None, the same without details) when the destination
# accepted it, else what went wrong.
Results = dict[int, WireEvent | Delivered | None]

# A message's content by its id, read from the queue when the agent is about to send it.
Content = Callable[[int], Awaitable[bytes]]


class DeliveryAgent(Protocol):
    """Delivers one route's parcels and reports per recipient."""

    def deliver(
        self, route: Route, parcels: Sequence[Parcel], content: Content
    ) -> AsyncIterator[tuple[Parcel, Results]]:
        """Deliver the parcels in order, yielding each with its results.

        An exception out of the iterator means the parcel it was on has no result: the
        queue manager defers that one and hands the rest to a new call. Closed at a yield
        (the queue manager stopping), it starts nothing more.
        """
        ...

    async def close_idle(self, *, older_than: float = CACHE_TIME_LIMIT) -> None:
        """Close what it keeps open between deliveries longer than `older_than` (0: all)."""
        ...

    @property
    def has_idle(self) -> bool:
        """It keeps something open that `close_idle` will close."""
        ...
