"""The embedded spool backend: one SQLite file (WAL), written by this process's group commit.

`SqliteSpool` implements `relay.spool.protocol.Spool` by composing the schema (opening,
migrations), the writer (every write), the queue manager's reads and the views over one
connection. Open it with `await open_spool(path)`, close it with `await spool.close()`.
Other processes (the CLI) open the same file; a running server notices their commits
through `data_version()` (PRAGMA data_version).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from relay.spool import reads, schema, views
from relay.spool.protocol import Spool
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
from relay.spool.writer import Selection, Writer
from relay.states import Event, Status

T = TypeVar("T")


async def open_spool(path: Path, *, create: bool = True) -> SqliteSpool:
    """The queue database at `path`, migrated; `create=False` refuses to make a new one."""
    conn = await schema.connect(path, create=create)
    try:
        next_id = await _next_message_id(conn)
    except BaseException as exc:
        await conn.close()
        if isinstance(exc, sqlite3.Error):
            raise schema.open_error(path, exc) from exc
        raise
    return SqliteSpool(conn, path, next_id=next_id)


async def _next_message_id(conn: aiosqlite.Connection) -> int:
    """Past every id ever used, deleted messages' included (AUTOINCREMENT's sequence)."""
    async with conn.execute("SELECT coalesce(max(id), 0) AS last FROM messages") as cur:
        row = await cur.fetchone()
    async with conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'") as cur:
        seq = await cur.fetchone()
    return max(row["last"] if row else 0, seq["seq"] if seq else 0) + 1


class SqliteSpool:
    """The queue in one SQLite file (see the module docstring)."""

    def __init__(self, conn: aiosqlite.Connection, path: Path, *, next_id: int) -> None:
        self._conn = conn
        self.path = path
        self._writer = writer = Writer(conn, next_id=next_id)
        self.on_commit: list[Callable[[], None]] = writer.on_commit
        # The hot paths (intake's id and enqueue, the queue manager's results) are the
        # writer's own methods: no extra call per message.
        self.reserve_id: Callable[[], int] = writer.reserve_id
        self.enqueue: Callable[[NewMessage], Coroutine[Any, Any, int]] = writer.enqueue
        self.record: Callable[[Sequence[Result]], Coroutine[Any, Any, None]] = writer.record

    async def close(self) -> None:
        await self._writer.close()
        await self._conn.close()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A damaged page found by a read says so, and what to do, as a StoreError; any
        other error is left as it is."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            error = schema.file_error(self.path, exc)
            if error is None:
                raise
            raise error from exc

    # ---- the queue manager --------------------------------------------------------------

    async def due(
        self, *, now: float, limit: int, exclude: Iterable[int] = ()
    ) -> list[RecipientRow]:
        with self._reading():
            return await reads.due(self._conn, now=now, limit=limit, exclude=exclude)

    async def next_due_after(self, now: float) -> float | None:
        with self._reading():
            return await reads.next_due_after(self._conn, now)

    async def envelopes(self, message_ids: Sequence[int]) -> dict[int, tuple[str, int, float]]:
        with self._reading():
            return await reads.envelopes(self._conn, message_ids)

    async def contents(self, message_ids: Sequence[int]) -> dict[int, bytes]:
        with self._reading():
            return await reads.contents(self._conn, message_ids)

    async def content(self, message_id: int) -> bytes:
        with self._reading():
            return await reads.content(self._conn, message_id)

    async def bounces_due(self, *, limit: int = 200) -> list[int]:
        with self._reading():
            return await reads.bounces_due(self._conn, limit=limit)

    async def send_bounce(
        self, message: int, recipients: Sequence[int], ndr: NewMessage | None
    ) -> None:
        await self._writer.send_bounce(message, recipients, ndr)

    async def purge(self, *, before: float) -> int:
        return await self._writer.purge(before=before)

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
        return await self._writer.change(event, Selection(message, connector, domains), now=now)

    # ---- views --------------------------------------------------------------------------

    async def message_exists(self, message_id: int) -> bool:
        with self._reading():
            return await views.message_exists(self._conn, message_id)

    async def list_messages(
        self,
        *,
        status: Status | None = None,
        where: ListFilter | None = None,
        limit: int | None = None,
        newest: bool = False,
    ) -> list[MessageRow]:
        with self._reading():
            return await views.list_messages(
                self._conn, status=status, where=where, limit=limit, newest=newest
            )

    async def get_message(self, message_id: int, *, history: bool = False) -> MessageRow | None:
        with self._reading():
            return await views.get_message(self._conn, message_id, history=history)

    async def history(self, recipient_id: int) -> list[Attempt]:
        with self._reading():
            return await views.attempts(self._conn, recipient_id)

    async def digest(self) -> list[DigestRow]:
        with self._reading():
            return await views.digest(self._conn)

    # ---- runtime settings and change notification ---------------------------------------

    async def get_setting(self, key: Key[T]) -> T | None:
        with self._reading():
            return await views.setting(self._conn, key)

    async def set_setting(self, key: Key[T], value: T | None) -> None:
        await self._writer.set_setting(key, value)

    async def settings(self, family: Family[Any] | None = None) -> dict[str, str]:
        with self._reading():
            return await views.settings(self._conn, family.prefix if family else "")

    async def data_version(self) -> int:
        """Changes whenever another connection (the CLI) commits."""
        async with self._conn.execute("PRAGMA data_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # ---- diagnostics --------------------------------------------------------------------

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read of the database as it is, as plain tuples: for tests and diagnostics that
        check what was stored. The relay itself reads through the methods above."""
        async with self._conn.execute(sql, params) as cur:
            return [tuple(row) for row in await cur.fetchall()]


# mypy checks here that the backend implements the interface the relay uses.
_: type[Spool] = SqliteSpool
