"""The reads behind what people see: `queue list`, `queue show` (a message, its recipients and
their attempt history), the queue digest and alerts, and the stored settings.

Rows map to their value types by column name. Which recipients count as still queued comes
from `relay.states` (UNFINISHED), never from status literals.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from typing import Any, TypeVar

import aiosqlite

from relay.spool.reads import RECIPIENT_COLUMNS, recipient_row
from relay.spool.rows import Attempt, DigestRow, LastError, ListFilter, MessageRow
from relay.spool.settings import Key
from relay.states import UNFINISHED, Status, sql_in

T = TypeVar("T")

_MESSAGE_COLUMNS = (
    "id, message_id, mail_from, subject, size, received_at, client_address, client_helo"
)
_CHUNK = 500  # message ids per query when attaching recipients (SQLite's variable limit)


def _message(row: sqlite3.Row) -> MessageRow:
    return MessageRow(
        id=row["id"],
        message_id=row["message_id"],
        mail_from=row["mail_from"],
        subject=row["subject"],
        size=row["size"],
        received_at=row["received_at"],
        client_address=row["client_address"],
        client_helo=row["client_helo"],
    )


async def message_exists(conn: aiosqlite.Connection, message_id: int) -> bool:
    async with conn.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,)) as cur:
        return await cur.fetchone() is not None


async def list_messages(
    conn: aiosqlite.Connection,
    *,
    status: Status | None = None,
    where: ListFilter | None = None,
    limit: int | None = None,
    newest: bool = False,
) -> list[MessageRow]:
    """Messages oldest first (newest last, as mailq), with their recipients.

    With `status`, only messages that have a recipient in that state; with `where`, only
    those it selects (`ListFilter`). With `limit`, the first `limit` of them (or the last,
    with newest=True) so a huge queue lists fast.
    """
    where = where or ListFilter()
    if status is not None:
        where = dataclasses.replace(where, statuses=frozenset({status}))
    clauses, params = _filter_sql(where)
    order = "DESC" if newest else "ASC"
    condition = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages {condition} ORDER BY id {order}"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    async with conn.execute(sql, params) as cur:
        messages = [_message(row) for row in await cur.fetchall()]
    if newest:
        messages.reverse()
    await _attach_recipients(conn, messages)
    return messages


def _filter_sql(where: ListFilter) -> tuple[list[str], list[Any]]:
    """The WHERE clauses over `messages` (and their parameters) for a ListFilter."""
    clauses: list[str] = []
    params: list[Any] = []
    per_recipient: list[str] = []
    if where.statuses is not None:
        per_recipient.append(f"status IN {sql_in(where.statuses)}" if where.statuses else "0")
    if where.connector is not None:
        per_recipient.append("connector = ?")
        params.append(where.connector)
    if where.recipient is not None:
        per_recipient.append("lower(address) = lower(?)")
        params.append(where.recipient)
    if per_recipient:
        clauses.append(
            f"id IN (SELECT message FROM recipients WHERE {' AND '.join(per_recipient)})"
        )
    if where.mail_from is not None:
        clauses.append("lower(mail_from) = lower(?)")
        params.append(where.mail_from)
    return clauses, params


async def get_message(
    conn: aiosqlite.Connection, message_id: int, *, history: bool = False
) -> MessageRow | None:
    sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?"
    async with conn.execute(sql, (message_id,)) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    message = _message(row)
    await _attach_recipients(conn, [message])
    if history:
        for recipient in message.recipients:
            recipient.history = await attempts(conn, recipient.id)
    return message


async def _attach_recipients(conn: aiosqlite.Connection, messages: list[MessageRow]) -> None:
    by_id = {m.id: m for m in messages}
    ids = list(by_id)
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE message IN ({marks}) ORDER BY id"
        async with conn.execute(sql, chunk) as cur:
            for row in await cur.fetchall():
                recipient = recipient_row(row)
                by_id[recipient.message].recipients.append(recipient)


async def attempts(conn: aiosqlite.Connection, recipient_id: int) -> list[Attempt]:
    """A recipient's attempt history, oldest first."""
    sql = "SELECT at, code, reply, server, ip FROM attempts WHERE recipient = ? ORDER BY id"
    async with conn.execute(sql, (recipient_id,)) as cur:
        return [
            Attempt(at=r["at"], code=r["code"], reply=r["reply"], server=r["server"], ip=r["ip"])
            for r in await cur.fetchall()
        ]


# Unfinished recipients grouped by route and last error code (Get-QueueDigest). One pass over
# the recipients_pending index (no row reads, no JSON); then each group's oldest message and
# latest error are looked up once.
_DIGEST = f"""
    SELECT g.connector AS connector, g.code AS code, g.messages AS messages,
           g.recipients AS recipients, g.held AS held, g.deferred AS deferred,
           (SELECT received_at FROM messages WHERE id = g.first) AS started,
           g.next_retry AS next_retry, g.oldest_expiry AS oldest_expiry,
           (SELECT last_error FROM recipients l
             WHERE l.connector = g.connector AND l.error_code IS g.code
               AND l.status IN {sql_in(UNFINISHED)}
             ORDER BY l.error_at DESC LIMIT 1) AS last_error
    FROM (
        SELECT connector, error_code AS code,
               count(DISTINCT message) AS messages,
               count(*) AS recipients,
               sum(status = :held) AS held,
               sum(status = :deferred) AS deferred,
               min(message) AS first,
               min(next_attempt_at) AS next_retry,
               min(expires_at) AS oldest_expiry
        FROM recipients INDEXED BY recipients_pending
        WHERE status IN {sql_in(UNFINISHED)}
        GROUP BY connector, error_code
    ) AS g
    ORDER BY started
"""


async def digest(conn: aiosqlite.Connection) -> list[DigestRow]:
    params = {"held": Status.HELD.value, "deferred": Status.DEFERRED.value}
    async with conn.execute(_DIGEST, params) as cur:
        return [
            DigestRow(
                connector=row["connector"],
                code=row["code"],
                messages=row["messages"],
                recipients=row["recipients"],
                held=row["held"] or 0,
                deferred=row["deferred"] or 0,
                queue_started_at=row["started"],
                next_retry_at=row["next_retry"],
                oldest_expires_at=row["oldest_expiry"],
                last_error=LastError.from_json(row["last_error"]),
            )
            for row in await cur.fetchall()
        ]


async def setting(conn: aiosqlite.Connection, key: Key[T]) -> T | None:
    async with conn.execute("SELECT value FROM settings WHERE key = ?", (key.text,)) as cur:
        row = await cur.fetchone()
    return None if row is None else key.decode(str(row["value"]))


async def settings(conn: aiosqlite.Connection, prefix: str = "") -> dict[str, str]:
    """The stored text of the settings whose key starts with `prefix`, by key."""
    async with conn.execute(
        "SELECT key, value FROM settings WHERE key LIKE ? ORDER BY key", (prefix + "%",)
    ) as cur:
        return {str(r["key"]): str(r["value"]) for r in await cur.fetchall()}
