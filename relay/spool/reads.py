"""The queue manager's reads: what is due, when the next recipient is, the envelopes and
contents to send, and the messages owed an NDR.

Every row is mapped to its value type by column name (the connection returns
`sqlite3.Row`), never by position, so a column added to a SELECT cannot shift another.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence

import aiosqlite

from relay.errors import StoreError
from relay.spool.rows import LastError, RecipientRow
from relay.states import Status

RECIPIENT_COLUMNS = (
    "id, message, address, status, connector, attempts, next_attempt_at, expires_at, "
    "delivered_at, last_error, ndr_due"
)


def recipient_row(row: sqlite3.Row) -> RecipientRow:
    """A recipient from a row holding RECIPIENT_COLUMNS."""
    return RecipientRow(
        id=row["id"],
        message=row["message"],
        address=row["address"],
        status=Status(row["status"]),
        connector=row["connector"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        expires_at=row["expires_at"],
        delivered_at=row["delivered_at"],
        last_error=LastError.from_json(row["last_error"]),
        ndr_due=bool(row["ndr_due"]),
    )


async def due(
    conn: aiosqlite.Connection, *, now: float, limit: int, exclude: Iterable[int] = ()
) -> list[RecipientRow]:
    """Waiting recipients whose next attempt (or expiry) is due, oldest message first.

    Only waiting recipients are scheduled (have a next attempt), so the recipients_due
    index alone answers it.
    """
    sql = (
        f"SELECT {RECIPIENT_COLUMNS} FROM recipients "
        "WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= ? "
        "AND id NOT IN (SELECT value FROM json_each(?)) "
        "ORDER BY next_attempt_at, message, id LIMIT ?"
    )
    params = (now, json.dumps(list(exclude)), limit)
    async with conn.execute(sql, params) as cur:
        return [recipient_row(row) for row in await cur.fetchall()]


async def next_due_after(conn: aiosqlite.Connection, now: float) -> float | None:
    """The earliest next attempt later than `now` (the recipients_due index's range)."""
    async with conn.execute(
        "SELECT min(next_attempt_at) AS next FROM recipients WHERE next_attempt_at > ?", (now,)
    ) as cur:
        row = await cur.fetchone()
    return None if row is None or row["next"] is None else float(row["next"])


async def envelopes(
    conn: aiosqlite.Connection, message_ids: Sequence[int]
) -> dict[int, tuple[str, int, float]]:
    """Sender, size and arrival time of each message."""
    sql = (
        "SELECT id, mail_from, size, received_at FROM messages "
        "WHERE id IN (SELECT value FROM json_each(?))"
    )
    async with conn.execute(sql, (json.dumps(list(message_ids)),)) as cur:
        return {
            int(r["id"]): (str(r["mail_from"]), int(r["size"]), float(r["received_at"]))
            for r in await cur.fetchall()
        }


async def contents(conn: aiosqlite.Connection, message_ids: Sequence[int]) -> dict[int, bytes]:
    """Several messages' content in one query (the caller bounds their total size)."""
    sql = "SELECT id, content FROM messages WHERE id IN (SELECT value FROM json_each(?))"
    async with conn.execute(sql, (json.dumps(list(message_ids)),)) as cur:
        return {int(r["id"]): bytes(r["content"]) for r in await cur.fetchall()}


async def content(conn: aiosqlite.Connection, message_id: int) -> bytes:
    async with conn.execute("SELECT content FROM messages WHERE id = ?", (message_id,)) as cur:
        row = await cur.fetchone()
    if row is None:
        raise StoreError(f"message {message_id} is not in the queue")
    return bytes(row["content"])


async def bounces_due(conn: aiosqlite.Connection, *, limit: int) -> list[int]:
    """Messages with recipients owed an NDR, oldest first."""
    sql = "SELECT DISTINCT message FROM recipients WHERE ndr_due = 1 ORDER BY message LIMIT ?"
    async with conn.execute(sql, (limit,)) as cur:
        return [int(r["message"]) for r in await cur.fetchall()]
