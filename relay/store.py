"""The queue store: the SQLite schema, its migrations, and every SQL statement the relay runs.

One writer per process. Concurrent intake sessions share commits (group commit): each
session hands its insert to the writer and awaits a future that resolves only once the
batch holding it is durable (WAL, synchronous=FULL), so no 250 is ever sent before the
commit. Other processes (the CLI) open the same file; the server notices their commits
through PRAGMA data_version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from relay.errors import StoreError
from relay.spool.rows import (
    Attempt,
    DigestRow,
    LastError,
    MessageRow,
    NewMessage,
    RecipientRow,
    Result,
)
from relay.states import Event, Status

T = TypeVar("T")
Op = Callable[[aiosqlite.Connection], Awaitable[Any]]

log = logging.getLogger("relay.store")


BUSY_TIMEOUT_MS = 5000

MIGRATIONS: tuple[str, ...] = (
    # 1: messages, one delivery row per recipient, the attempt history, settings.
    """
    CREATE TABLE messages (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id      TEXT NOT NULL,
        mail_from       TEXT NOT NULL,
        subject         TEXT NOT NULL,
        size            INTEGER NOT NULL,
        received_at     REAL NOT NULL,
        client_address  TEXT NOT NULL,
        client_helo     TEXT NOT NULL,
        content         BLOB NOT NULL
    );
    CREATE TABLE recipients (
        id              INTEGER PRIMARY KEY,
        message         INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        address         TEXT NOT NULL,
        status          TEXT NOT NULL,
        connector       TEXT NOT NULL DEFAULT '',
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        expires_at      REAL NOT NULL,
        delivered_at    REAL,
        finished_at     REAL,
        last_error      TEXT
    );
    CREATE INDEX recipients_due ON recipients(next_attempt_at, message)
        WHERE next_attempt_at IS NOT NULL;
    CREATE INDEX recipients_message ON recipients(message);
    CREATE INDEX recipients_status ON recipients(status, message);
    CREATE INDEX recipients_finished ON recipients(finished_at) WHERE finished_at IS NOT NULL;
    CREATE TABLE attempts (
        id              INTEGER PRIMARY KEY,
        recipient       INTEGER NOT NULL REFERENCES recipients(id) ON DELETE CASCADE,
        at              REAL NOT NULL,
        code            TEXT NOT NULL,
        reply           TEXT NOT NULL,
        server          TEXT,
        ip              TEXT
    );
    CREATE INDEX attempts_recipient ON attempts(recipient);
    CREATE TABLE settings (
        key             TEXT PRIMARY KEY,
        value           TEXT NOT NULL
    );
    """,
    # 2: an NDR owed. A failure and its flag are written together; the bounce step sends one
    # NDR per message and clears the flags in the transaction that queues it, so a crash in
    # between neither loses the NDR nor sends it twice.
    """
    ALTER TABLE recipients ADD COLUMN ndr_due INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX recipients_ndr_due ON recipients(message) WHERE ndr_due = 1;
    """,
    # 3: the last error's code and time as columns, so the digest and the alerts group a
    # large queue from one index instead of parsing every row's JSON.
    """
    ALTER TABLE recipients ADD COLUMN error_code TEXT;
    ALTER TABLE recipients ADD COLUMN error_at REAL;
    UPDATE recipients SET error_code = json_extract(last_error, '$.code'),
        error_at = json_extract(last_error, '$.at') WHERE last_error IS NOT NULL;
    CREATE INDEX recipients_pending ON recipients(
        status, connector, error_code, message, next_attempt_at, expires_at, error_at);
    CREATE INDEX recipients_latest_error ON recipients(connector, error_code, error_at);
    """,
)


_RECIPIENT_COLUMNS = (
    "id, message, address, status, connector, attempts, next_attempt_at, expires_at, "
    "delivered_at, last_error, ndr_due"
)
_MESSAGE_COLUMNS = (
    "id, message_id, mail_from, subject, size, received_at, client_address, client_helo"
)


def _recipient(row: sqlite3.Row | tuple[Any, ...]) -> RecipientRow:
    return RecipientRow(
        id=row[0],
        message=row[1],
        address=row[2],
        status=Status(row[3]),
        connector=row[4],
        attempts=row[5],
        next_attempt_at=row[6],
        expires_at=row[7],
        delivered_at=row[8],
        last_error=LastError.from_json(row[9]),
        ndr_due=bool(row[10]),
    )


def _message(row: sqlite3.Row | tuple[Any, ...]) -> MessageRow:
    return MessageRow(*row)


class Store:
    """The queue database. Open with `await Store.open(path)`; close with `await close()`."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._pending: list[_Entry] = []
        self._flusher: asyncio.Task[None] | None = None
        self._next_id = 0
        self.on_commit: list[Callable[[], None]] = []

    @classmethod
    async def open(cls, path: Path, *, create: bool = True) -> Store:
        if not create and not path.exists():  # noqa: ASYNC240 - one stat, before any I/O
            raise StoreError(f"no queue database at {path}; start `relay serve` once to create it")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the queue database {path}: {exc}") from exc
        store = cls(conn, path)
        try:
            await store._configure()
        except sqlite3.Error as exc:
            await conn.close()
            raise StoreError(f"cannot open the queue database {path}: {exc}") from exc
        return store

    async def _configure(self) -> None:
        conn = self._conn
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk before it returns, so 250 means durable (also in WAL mode).
        await conn.execute("PRAGMA synchronous = FULL")
        await conn.execute("PRAGMA foreign_keys = ON")
        await self._migrate()
        async with conn.execute("SELECT coalesce(max(id), 0) FROM messages") as cur:
            row = await cur.fetchone()
        async with conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'") as cur:
            seq = await cur.fetchone()
        self._next_id = max(row[0] if row else 0, seq[0] if seq else 0) + 1

    async def _migrate(self) -> None:
        async with self._conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = row[0] if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this relay knows "
                f"({len(MIGRATIONS)}); upgrade mailflow-relay"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        await self._conn.execute(statement)
                await self._conn.execute(f"PRAGMA user_version = {number}")
                await self._conn.commit()
            except BaseException:
                await self._conn.rollback()
                raise

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        await self._conn.close()

    # ---- the writer: group commit ---------------------------------------------------

    def reserve_id(self) -> int:
        """The next message id; the caller writes it into the Received header before queueing."""
        value = self._next_id
        self._next_id += 1
        return value

    async def _write(self, op: Op | _Enqueue | _Record) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await self._transaction(batch)
            except Exception as exc:
                committed = await self._one_by_one(batch, exc)
            else:
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
                committed = True
            if committed:
                for listener in self.on_commit:
                    listener()

    async def _transaction(self, batch: Sequence[_Entry]) -> list[Any]:
        """Run a batch in one transaction and return each op's result; nothing partial."""
        conn = self._conn
        results: list[Any] = []
        await conn.execute("BEGIN IMMEDIATE")
        try:
            # All the sessions' messages in two statements, all the delivery results in
            # one or two, then the other writes in order.
            arrivals = [op.message for op, _ in batch if isinstance(op, _Enqueue)]
            if arrivals:
                await _insert_messages(conn, arrivals)
            written = [r for op, _ in batch if isinstance(op, _Record) for r in op.results]
            if written:
                await _write_results(conn, written)
            for op, _ in batch:
                if isinstance(op, _Enqueue):
                    results.append(op.message.id)
                elif isinstance(op, _Record):
                    results.append(None)
                else:
                    results.append(await op(conn))
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
        return results

    async def _one_by_one(self, batch: Sequence[_Entry], error: Exception) -> bool:
        """A batch failed: run each op in a transaction of its own, so that only an op
        that fails alone fails (its session answers 451) and the others commit.

        Separate transactions rather than a SAVEPOINT per op: the fast path stays one
        transaction with no savepoints, and a failure at COMMIT (a full disk is found out
        when the WAL is written, at commit) is pinned on the op that needed the space,
        which a savepoint cannot do; SQLite may also roll back the whole transaction on
        SQLITE_FULL or an I/O error, taking every savepoint with it. The price, one commit
        per op, is paid only by a batch that failed. Returns True if anything committed.
        """
        if len(batch) == 1:  # nothing to tell apart
            _, future = batch[0]
            if not future.done():
                future.set_exception(StoreError(str(error)))
            return False
        log.warning("a batch of %d writes failed (%s); writing them one by one", len(batch), error)
        committed = False
        for entry in batch:
            future = entry[1]
            try:
                (result,) = await self._transaction([entry])
            except Exception as exc:
                if not future.done():
                    future.set_exception(StoreError(str(exc)))
                continue
            committed = True
            if not future.done():
                future.set_result(result)
        return committed

    async def enqueue(self, message: NewMessage) -> int:
        """Queue a message; returns its id once it is committed to disk."""
        return await self._write(_Enqueue(message))  # type: ignore[no-any-return]

    async def record(self, results: Sequence[Result]) -> None:
        """Write the queue manager's results (failures carry their NDR-owed flag)."""
        await self._write(_Record(results))

    async def bounces_due(self, *, limit: int = 200) -> list[int]:
        """Messages with recipients owed an NDR, oldest first."""
        sql = "SELECT DISTINCT message FROM recipients WHERE ndr_due = 1 ORDER BY message LIMIT ?"
        async with self._conn.execute(sql, (limit,)) as cur:
            return [int(r[0]) for r in await cur.fetchall()]

    async def send_bounce(
        self, message: int, recipients: Sequence[int], ndr: NewMessage | None
    ) -> None:
        """Queue a message's NDR (None: nothing to send, e.g. a null sender) and clear the flags."""

        async def op(conn: aiosqlite.Connection) -> None:
            if ndr is not None:
                await _insert_message(conn, ndr)
            await conn.execute(
                "UPDATE recipients SET ndr_due = 0 WHERE message = ? AND id IN "
                "(SELECT value FROM json_each(?))",
                (message, json.dumps(list(recipients))),
            )

        await self._write(op)

    async def execute_write(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement in the writer's transaction; returns the number of rows changed."""

        async def op(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(sql, params)
            return cursor.rowcount

        return await self._write(op)  # type: ignore[no-any-return]

    # ---- reading ----------------------------------------------------------------------

    async def data_version(self) -> int:
        """Changes whenever another connection (the CLI) commits."""
        async with self._conn.execute("PRAGMA data_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def list_messages(
        self, *, status: Status | None = None, limit: int | None = None, newest: bool = False
    ) -> list[MessageRow]:
        """Messages oldest first (newest last, as mailq), with their recipients.

        With `status`, only messages that have a recipient in that state. With `limit`, the
        first `limit` of them (or the last, with newest=True) so a huge queue lists fast.
        """
        where = ""
        params: list[Any] = []
        if status is not None:
            where = "WHERE id IN (SELECT message FROM recipients WHERE status = ?)"
            params.append(status.value)
        order = "DESC" if newest else "ASC"
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages {where} ORDER BY id {order}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        async with self._conn.execute(sql, params) as cur:
            messages = [_message(row) for row in await cur.fetchall()]
        if newest:
            messages.reverse()
        await self._attach_recipients(messages)
        return messages

    async def _attach_recipients(self, messages: list[MessageRow]) -> None:
        by_id = {m.id: m for m in messages}
        ids = list(by_id)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE message IN ({marks}) ORDER BY id"
            async with self._conn.execute(sql, chunk) as cur:
                for row in await cur.fetchall():
                    recipient = _recipient(row)
                    by_id[recipient.message].recipients.append(recipient)

    async def get_message(self, message_id: int, *, history: bool = False) -> MessageRow | None:
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?"
        async with self._conn.execute(sql, (message_id,)) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        message = _message(row)
        await self._attach_recipients([message])
        if history:
            for recipient in message.recipients:
                recipient.history = await self.history(recipient.id)
        return message

    async def history(self, recipient_id: int) -> list[Attempt]:
        sql = "SELECT at, code, reply, server, ip FROM attempts WHERE recipient = ? ORDER BY id"
        async with self._conn.execute(sql, (recipient_id,)) as cur:
            return [Attempt(*row) for row in await cur.fetchall()]

    async def content(self, message_id: int) -> bytes:
        async with self._conn.execute(
            "SELECT content FROM messages WHERE id = ?", (message_id,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            raise StoreError(f"message {message_id} is not in the queue")
        return bytes(row[0])

    async def due(
        self, *, now: float, limit: int, exclude: Iterable[int] = ()
    ) -> list[RecipientRow]:
        """Pending recipients whose next attempt (or expiry) is due, oldest message first."""
        sql = (
            f"SELECT {_RECIPIENT_COLUMNS} FROM recipients "
            "WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= ? "
            "AND id NOT IN (SELECT value FROM json_each(?)) "
            "ORDER BY next_attempt_at, message, id LIMIT ?"
        )
        params = (now, json.dumps(list(exclude)), limit)
        async with self._conn.execute(sql, params) as cur:
            return [_recipient(row) for row in await cur.fetchall()]

    async def next_due_at(self, *, exclude: Iterable[int] = ()) -> float | None:
        sql = (
            "SELECT min(next_attempt_at) FROM recipients WHERE next_attempt_at IS NOT NULL "
            "AND id NOT IN (SELECT value FROM json_each(?))"
        )
        async with self._conn.execute(sql, (json.dumps(list(exclude)),)) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def next_due_after(self, now: float) -> float | None:
        """The earliest next attempt later than `now` (the recipients_due index's range)."""
        async with self._conn.execute(
            "SELECT min(next_attempt_at) FROM recipients WHERE next_attempt_at > ?", (now,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def envelopes(self, message_ids: Sequence[int]) -> dict[int, tuple[str, int]]:
        """Sender and size of each message."""
        sql = (
            "SELECT id, mail_from, size FROM messages WHERE id IN (SELECT value FROM json_each(?))"
        )
        async with self._conn.execute(sql, (json.dumps(list(message_ids)),)) as cur:
            return {int(r[0]): (str(r[1]), int(r[2])) for r in await cur.fetchall()}

    async def contents(self, message_ids: Sequence[int]) -> dict[int, bytes]:
        """Several messages' content in one query (the caller bounds their total size)."""
        sql = "SELECT id, content FROM messages WHERE id IN (SELECT value FROM json_each(?))"
        async with self._conn.execute(sql, (json.dumps(list(message_ids)),)) as cur:
            return {int(r[0]): bytes(r[1]) for r in await cur.fetchall()}

    async def retry_now(self, *, connector: str, now: float) -> int:
        """Make a connector's deferred recipients due now (it is reachable again)."""
        return await self.execute_write(
            "UPDATE recipients SET next_attempt_at = ? WHERE connector = ? AND status = ? "
            "AND next_attempt_at > ?",
            (now, connector, Status.DEFERRED.value, now),
        )

    async def purge(self, *, before: float) -> int:
        """Delete messages all of whose recipients finished before `before` (retention)."""
        return await self.execute_write(
            "DELETE FROM messages WHERE id IN (SELECT message FROM recipients "
            "WHERE finished_at IS NOT NULL AND finished_at < ?) AND id NOT IN (SELECT message "
            "FROM recipients WHERE finished_at IS NULL OR finished_at >= ?)",
            (before, before),
        )

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read for the views (digest, alerts) that have their own SQL."""
        async with self._conn.execute(sql, params) as cur:
            return [tuple(row) for row in await cur.fetchall()]

    # ---- queue actions (relay queue retry/hold/release/expire/delete) ----------------

    async def change(
        self,
        event: Event,
        *,
        now: float,
        message: int | None = None,
        connector: str | None = None,
        domains: Sequence[str] = (),
    ) -> int:
        """An administrator's event for the recipients selected (see Spool.change)."""
        if event is Event.RETRY_NOW:
            if domains:
                return await self.retry_domains(domains, now=now)
            return await self.retry(now=now, message=message, connector=connector)
        if message is None:
            raise ValueError(f"{event} needs a message")
        if event is Event.HOLD:
            return await self.hold(message)
        if event is Event.RELEASE:
            return await self.release(message, now=now)
        if event is Event.EXPIRE_NOW:
            return await self.expire(message, now=now)
        if event is Event.DELETE:
            return await self.delete(message)
        raise ValueError(f"{event} is not an administrator's event")

    async def message_exists(self, message_id: int) -> bool:
        async with self._conn.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,)) as cur:
            return await cur.fetchone() is not None

    async def retry(
        self, *, now: float, message: int | None = None, connector: str | None = None
    ) -> int:
        """Pending recipients due now (postqueue -f, Retry-Queue); all of them without filters."""
        sql = "UPDATE recipients SET next_attempt_at = ? WHERE status IN ('queued', 'deferred')"
        params: list[Any] = [now]
        if message is not None:
            sql += " AND message = ?"
            params.append(message)
        if connector is not None:
            sql += " AND connector = ?"
            params.append(connector)
        return await self.execute_write(sql, params)

    async def retry_domains(self, domains: Sequence[str], *, now: float) -> int:
        """Pending recipients in these domains due now (after Fix now changed their fate)."""
        total = 0
        for domain in domains:
            total += await self.execute_write(
                "UPDATE recipients SET next_attempt_at = ? WHERE status IN ('queued', 'deferred') "
                "AND lower(address) LIKE ? ESCAPE '\\'",
                (now, "%@" + domain.replace("%", "\\%").replace("_", "\\_")),
            )
        return total

    async def hold(self, message: int) -> int:
        """Postfix's hold queue: neither tried nor expired until released."""
        return await self.execute_write(
            "UPDATE recipients SET status = 'held', next_attempt_at = NULL "
            "WHERE message = ? AND status IN ('queued', 'deferred')",
            (message,),
        )

    async def release(self, message: int, *, now: float) -> int:
        return await self.execute_write(
            "UPDATE recipients SET status = CASE WHEN attempts > 0 THEN 'deferred' "
            "ELSE 'queued' END, next_attempt_at = ? WHERE message = ? AND status = 'held'",
            (now, message),
        )

    async def expire(self, message: int, *, now: float) -> int:
        """Expire now (postsuper -e, exim -Mg): the worker turns it into the NDR at once."""
        return await self.execute_write(
            "UPDATE recipients SET status = CASE WHEN status = 'held' THEN "
            "(CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END) ELSE status END, "
            "expires_at = ?, next_attempt_at = ? "
            "WHERE message = ? AND status IN ('queued', 'deferred', 'held')",
            (now, now, message),
        )

    async def delete(self, message: int) -> int:
        """Remove a message and its recipients without an NDR (postsuper -d)."""
        return await self.execute_write("DELETE FROM messages WHERE id = ?", (message,))

    # ---- views: digest and alerts ---------------------------------------------------

    async def digest(self) -> list[DigestRow]:
        """Pending recipients grouped by route and last error code (Get-QueueDigest)."""
        # One pass over the recipients_pending index (no row reads, no JSON); then each
        # group's oldest message and latest error are looked up once.
        sql = """
            SELECT g.connector, g.code, g.messages, g.recipients, g.held, g.deferred,
                   (SELECT received_at FROM messages WHERE id = g.first) AS started,
                   g.next_retry, g.oldest_expiry,
                   (SELECT last_error FROM recipients l
                     WHERE l.connector = g.connector AND l.error_code IS g.code
                       AND l.status IN ('queued', 'deferred', 'held')
                     ORDER BY l.error_at DESC LIMIT 1) AS last_error
            FROM (
                SELECT connector, error_code AS code,
                       count(DISTINCT message) AS messages,
                       count(*) AS recipients,
                       sum(status = 'held') AS held,
                       sum(status = 'deferred') AS deferred,
                       min(message) AS first,
                       min(next_attempt_at) AS next_retry,
                       min(expires_at) AS oldest_expiry
                FROM recipients INDEXED BY recipients_pending
                WHERE status IN ('queued', 'deferred', 'held')
                GROUP BY connector, error_code
            ) AS g
            ORDER BY started
        """
        async with self._conn.execute(sql) as cur:
            return [
                DigestRow(
                    connector=row[0],
                    code=row[1],
                    messages=row[2],
                    recipients=row[3],
                    held=row[4] or 0,
                    deferred=row[5] or 0,
                    queue_started_at=row[6],
                    next_retry_at=row[7],
                    oldest_expires_at=row[8],
                    last_error=LastError.from_json(row[9]),
                )
                for row in await cur.fetchall()
            ]

    # ---- settings (clock offset, runtime changes) ----------------------------------

    async def get_setting(self, key: str) -> str | None:
        async with self._conn.execute("SELECT value FROM settings WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def set_setting(self, key: str, value: str | None) -> None:
        if value is None:
            await self.execute_write("DELETE FROM settings WHERE key = ?", (key,))
        else:
            await self.execute_write(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    async def settings(self, prefix: str) -> dict[str, str]:
        async with self._conn.execute(
            "SELECT key, value FROM settings WHERE key LIKE ? ORDER BY key", (prefix + "%",)
        ) as cur:
            return {str(k): str(v) for k, v in await cur.fetchall()}


@dataclass(frozen=True, slots=True)
class _Enqueue:
    """A message waiting for the writer's next batch."""

    message: NewMessage


@dataclass(frozen=True, slots=True)
class _Record:
    """Delivery results waiting for the writer's next batch."""

    results: Sequence[Result]


# One write waiting for the writer, and the future its caller awaits.
_Entry = tuple[Op | _Enqueue | _Record, "asyncio.Future[Any]"]


async def _insert_message(conn: aiosqlite.Connection, message: NewMessage) -> int:
    await _insert_messages(conn, [message])
    return message.id


async def _insert_messages(conn: aiosqlite.Connection, messages: Sequence[NewMessage]) -> None:
    await conn.executemany(
        "INSERT INTO messages (id, message_id, mail_from, subject, size, received_at, "
        "client_address, client_helo, content) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                m.id,
                m.message_id,
                m.mail_from,
                m.subject,
                len(m.content),
                m.received_at,
                m.client_address,
                m.client_helo,
                m.content,
            )
            for m in messages
        ],
    )
    await conn.executemany(
        "INSERT INTO recipients (message, address, status, connector, next_attempt_at, "
        "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
        [
            (m.id, r.address, Status.QUEUED.value, r.connector, m.received_at, m.expires_at)
            for m in messages
            for r in m.recipients
        ],
    )


async def _write_results(conn: aiosqlite.Connection, results: Sequence[Result]) -> None:
    rows = []
    history = []
    for r in results:
        change = r.change
        rows.append(
            (
                change.status.value,
                r.connector,
                1 if change.attempted else 0,
                change.next_attempt_at,
                r.at if change.status is Status.DELIVERED else None,
                r.at if change.final else None,
                r.error.to_json() if r.error else None,
                r.error.code if r.error else None,
                r.error.at if r.error else None,
                1 if change.ndr_owed else 0,
                r.recipient,
                r.was.value,
            )
        )
        if r.error is not None:
            e = r.error
            history.append((r.recipient, e.at, e.code, e.reply, e.server, e.ip))
    await conn.executemany(
        # Only while the recipient is in the state the change was decided from: one held,
        # expired or deleted from the CLI while its attempt was in flight keeps what the CLI
        # made of it. Never later than its expiry, which the CLI may have moved (relay queue
        # expire).
        "UPDATE recipients SET status = ?, connector = ?, attempts = attempts + ?, "
        "next_attempt_at = min(?, expires_at), delivered_at = coalesce(?, delivered_at), "
        "finished_at = ?, last_error = coalesce(?, last_error), "
        "error_code = coalesce(?, error_code), error_at = coalesce(?, error_at), ndr_due = ? "
        "WHERE id = ? AND status = ?",
        rows,
    )
    if history:
        await conn.executemany(
            "INSERT INTO attempts (recipient, at, code, reply, server, ip) VALUES (?, ?, ?, ?, ?, ?)",
            history,
        )
