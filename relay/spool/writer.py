"""The spool's writer: the group commit, and the only code that writes to the queue database.

One writer per process. Concurrent intake sessions share commits: each session hands its
insert to the writer and awaits a future that resolves only once the batch holding it is
durable (WAL, synchronous=FULL), so no 250 is ever sent before the commit. A batch is one
transaction: all its messages in two executemany statements, all its delivery results in one
or two, then the other writes (an NDR sent, an administrator's change, the purge, a setting)
in order. A batch that fails is written again one write per transaction, so only a write that
fails alone fails.

Every status written comes from `relay.states.step`: the queue manager's results arrive
decided (`Result`), and `change` decides an administrator's event with `step` for each
recipient it selects. No SQL here spells a status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiosqlite

from relay.errors import StoreError
from relay.spool.rows import NewMessage, Result
from relay.spool.settings import Key
from relay.states import ATTEMPTS, GIVE_UPS, Event, Recipient, Status, sources, sql_in, step

T = TypeVar("T")
Op = Callable[[aiosqlite.Connection], Awaitable[Any]]

log = logging.getLogger("relay.store")  # the name its log lines always had


@dataclass(frozen=True, slots=True)
class Selection:
    """The recipients an administrator's event applies to: all of them, or those of one
    message, one connector and/or these domains (any of them, case-insensitively)."""

    message: int | None = None
    connector: str | None = None
    domains: Sequence[str] = ()


class Writer:
    """The group commit over one connection; `reserve_id` hands out message ids."""

    def __init__(self, conn: aiosqlite.Connection, *, next_id: int) -> None:
        self._conn = conn
        self._pending: list[_Entry] = []
        self._flusher: asyncio.Task[None] | None = None
        self._next_id = next_id
        self.on_commit: list[Callable[[], None]] = []

    async def close(self) -> None:
        """Wait for the writes handed in so far to be written."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)

    def reserve_id(self) -> int:
        """The next message id; the caller writes it into the Received header before queueing."""
        value = self._next_id
        self._next_id += 1
        return value

    # ---- the writes ---------------------------------------------------------------------

    async def enqueue(self, message: NewMessage) -> int:
        """Queue a message; returns its id once it is committed to disk."""
        return await self._write(_Enqueue(message))  # type: ignore[no-any-return]

    async def record(self, results: Sequence[Result]) -> None:
        """Write the queue manager's results (failures carry their NDR-owed flag)."""
        await self._write(_Record(results))

    async def send_bounce(
        self, message: int, recipients: Sequence[int], ndr: NewMessage | None
    ) -> None:
        """Queue a message's NDR (None: nothing to send, e.g. a null sender) and clear the flags."""

        async def op(conn: aiosqlite.Connection) -> None:
            if ndr is not None:
                await _insert_messages(conn, [ndr])
            await conn.execute(
                "UPDATE recipients SET ndr_due = 0 WHERE message = ? AND id IN "
                "(SELECT value FROM json_each(?))",
                (message, json.dumps(list(recipients))),
            )

        await self._write(op)

    async def change(self, event: Event, selection: Selection, *, now: float) -> int:
        """An administrator's event for the selected recipients, in one transaction;
        returns how many recipients it applied to (DELETE: how many messages it deleted)."""
        if event in ATTEMPTS or event in GIVE_UPS:
            raise ValueError(f"{event} is a delivery result: the queue manager records it")
        if event is Event.DELETE:
            if selection.message is None or selection.connector or selection.domains:
                raise ValueError("delete removes one message: give its id, and only that")
            return await self._write(_delete_op(selection.message))  # type: ignore[no-any-return]
        return await self._write(_change_op(event, selection, now))  # type: ignore[no-any-return]

    async def purge(self, *, before: float) -> int:
        """Delete messages all of whose recipients finished before `before` (retention)."""

        async def op(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(
                "DELETE FROM messages WHERE id IN (SELECT message FROM recipients "
                "WHERE finished_at IS NOT NULL AND finished_at < ?) AND id NOT IN (SELECT "
                "message FROM recipients WHERE finished_at IS NULL OR finished_at >= ?)",
                (before, before),
            )
            return cursor.rowcount

        return await self._write(op)  # type: ignore[no-any-return]

    async def set_setting(self, key: Key[T], value: T | None) -> None:
        """Store a setting's value; None removes it (back to the config file's)."""

        async def op(conn: aiosqlite.Connection) -> None:
            if value is None:
                await conn.execute("DELETE FROM settings WHERE key = ?", (key.text,))
            else:
                await conn.execute(
                    "INSERT INTO settings (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key.text, key.encode(value)),
                )

        await self._write(op)

    # ---- the group commit ---------------------------------------------------------------

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


def _delete_op(message: int) -> Op:
    """Remove a message and its recipients without an NDR (postsuper -d); the recipients
    and their history go with it (ON DELETE CASCADE)."""

    async def op(conn: aiosqlite.Connection) -> int:
        cursor = await conn.execute("DELETE FROM messages WHERE id = ?", (message,))
        return cursor.rowcount

    return op


# An administrator's change as written: a recipient whose state stays and whose next attempt
# moves (a retry) touches one column and its indexes; any other change writes what `Change`
# holds. Both are guarded by the state the change was decided from, like the results.
_RESCHEDULE = "UPDATE recipients SET next_attempt_at = ? WHERE id = ? AND status = ?"
_CHANGE = (
    "UPDATE recipients SET status = ?, next_attempt_at = ?, expires_at = coalesce(?, expires_at), "
    "finished_at = ?, ndr_due = ? WHERE id = ? AND status = ?"
)
_STATUSES = {s.value: s for s in Status}
_READ_CHUNK = 5000  # rows of the selection read at a time


def _change_op(event: Event, selection: Selection, now: float) -> Op:
    """Read the selected recipients in the states `event` changes, decide each with `step`,
    then write the changes; the read and the writes share the transaction, so a recipient
    is written as it was read. Returns how many recipients the event applied to."""

    async def op(conn: aiosqlite.Connection) -> int:
        writes = _ChangeWrites(event, now)
        sql, params = _selected(event, selection)
        # Everything is read before anything is written (an update must not move rows under
        # the scan), in chunks, so a whole queue's rows are never in memory at once.
        async with conn.execute(sql, params) as cur:
            while found := await cur.fetchmany(_READ_CHUNK):
                for row in found:
                    writes.decide(row)
        await writes.write(conn)
        return writes.applied

    return op


@dataclass(slots=True)
class _ChangeWrites:
    """An administrator's change, recipient by recipient, as the statements that write it."""

    event: Event
    now: float
    applied: int = 0  # recipients it applies to, those it leaves as they were included
    moved: list[tuple[Any, ...]] = field(default_factory=list)  # _RESCHEDULE's parameters
    changed: list[tuple[Any, ...]] = field(default_factory=list)  # _CHANGE's parameters

    def decide(self, row: sqlite3.Row) -> None:
        was = _STATUSES[row["status"]]
        due = row["next_attempt_at"]
        change = step(Recipient(was, row["attempts"], due, row["expires_at"]), self.event, self.now)
        if change is None:  # pragma: no cover - the SELECT took only sources(event)
            return
        self.applied += 1
        if change.status is not was or change.expires_at is not None or change.final:
            self.changed.append(
                (
                    change.status.value,
                    change.next_attempt_at,
                    change.expires_at,
                    self.now if change.final else None,
                    1 if change.ndr_owed else 0,
                    row["id"],
                    was.value,
                )
            )
        elif change.next_attempt_at != due:  # a retry of mail already due writes nothing
            self.moved.append((change.next_attempt_at, row["id"], was.value))

    async def write(self, conn: aiosqlite.Connection) -> None:
        if self.moved:
            await conn.executemany(_RESCHEDULE, self.moved)
        if self.changed:
            await conn.executemany(_CHANGE, self.changed)


def _selected(event: Event, selection: Selection) -> tuple[str, list[Any]]:
    """The SELECT of the recipients `event` applies to within `selection`."""
    sql = (
        "SELECT id, status, attempts, next_attempt_at, expires_at FROM recipients "
        f"WHERE status IN {sql_in(sources(event))}"
    )
    params: list[Any] = []
    if selection.message is not None:
        sql += " AND message = ?"
        params.append(selection.message)
    if selection.connector is not None:
        sql += " AND connector = ?"
        params.append(selection.connector)
    if selection.domains:
        # Recipients at these domains, case-insensitively: LIKE '%@domain' with LIKE's own
        # wildcards in the domain escaped.
        sql += (
            " AND ("
            + " OR ".join(["lower(address) LIKE ? ESCAPE '\\'"] * len(selection.domains))
            + ")"
        )
        params += ["%@" + _like_escaped(d) for d in selection.domains]
    return sql, params


def _like_escaped(domain: str) -> str:
    return domain.replace("%", "\\%").replace("_", "\\_")
