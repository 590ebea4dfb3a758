"""The one interface to the spool: what the intake, the queue manager, the admin functions
and the CLI may ask of a queue backend. A second backend is one module implementing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from relay.spool.rows import (
    Attempt,
    DigestRow,
    ListFilter,
    MessageRow,
    NewMessage,
    RecipientRow,
    Result,
)
from relay.spool.settings import Family, Key
from relay.states import Event, Status

T = TypeVar("T")


class Spool(Protocol):
    """A queue backend. Every status it writes comes from `relay.states.step`."""

    on_commit: list[Callable[[], None]]  # called after each commit of this process

    async def close(self) -> None: ...

    # ---- intake -------------------------------------------------------------------------
    def reserve_id(self) -> int:
        """The next message id, known before the message is queued (Received: header)."""
        ...

    async def enqueue(self, message: NewMessage) -> int:
        """Queue a message; returns once it is durable (then the intake answers 250)."""
        ...

    # ---- the queue manager --------------------------------------------------------------
    async def due(
        self, *, now: float, limit: int, exclude: Iterable[int] = ()
    ) -> list[RecipientRow]:
        """Waiting recipients whose next attempt is due, oldest first."""
        ...

    async def next_due_after(self, now: float) -> float | None: ...

    async def envelopes(self, message_ids: Sequence[int]) -> dict[int, tuple[str, int, float]]:
        """Sender, size and arrival time (received_at) of each message."""
        ...

    async def contents(self, message_ids: Sequence[int]) -> dict[int, bytes]: ...

    async def content(self, message_id: int) -> bytes: ...

    async def record(self, results: Sequence[Result]) -> None:
        """Write the queue manager's results (attempts, give-ups)."""
        ...

    async def bounces_due(self, *, limit: int) -> list[int]:
        """Messages with recipients owed an NDR, oldest first."""
        ...

    async def send_bounce(
        self, message: int, recipients: Sequence[int], ndr: NewMessage | None
    ) -> None:
        """Queue a message's NDR (None: nothing to send) and clear what was owed."""
        ...

    async def purge(self, *, before: float) -> int: ...

    # ---- changes from an administrator (and the queue manager's retry-now) ---------------
    async def change(
        self,
        event: Event,
        *,
        now: float,
        message: int | None = None,
        connector: str | None = None,
        domains: Sequence[str] = (),
    ) -> int:
        """Apply an administrator's event (hold, release, expire now, retry now, delete) to
        the recipients selected (all, one message's, one connector's, these domains'), each
        decided by `relay.states.step`, in one transaction; returns how many recipients it
        applied to (a retry counts those already due as well). DELETE removes one message
        (`message` only) and returns 1, or 0 when it was not there."""
        ...

    # ---- views --------------------------------------------------------------------------
    async def message_exists(self, message_id: int) -> bool: ...

    async def list_messages(
        self,
        *,
        status: Status | None = None,
        where: ListFilter | None = None,
        limit: int | None = None,
        newest: bool = False,
    ) -> list[MessageRow]:
        """Messages oldest first, with their recipients: those with a recipient in `status`
        and selected by `where` (`ListFilter`); `limit` of them, the newest with `newest`."""
        ...

    async def get_message(self, message_id: int, *, history: bool = False) -> MessageRow | None: ...

    async def history(self, recipient_id: int) -> list[Attempt]: ...

    async def digest(self) -> list[DigestRow]: ...

    # ---- runtime settings and change notification ---------------------------------------
    async def get_setting(self, key: Key[T]) -> T | None:
        """A setting's value (relay.spool.settings); None when it is not set."""
        ...

    async def set_setting(self, key: Key[T], value: T | None) -> None:
        """Store a setting's value; None removes it."""
        ...

    async def settings(self, family: Family[Any] | None = None) -> dict[str, str]:
        """The stored text of every setting (or of one family's), by key: the snapshot that
        `Policy.build` and the alerts read with the typed keys."""
        ...

    async def data_version(self) -> int:
        """A number that changes when another process commits (the CLI's changes)."""
        ...
