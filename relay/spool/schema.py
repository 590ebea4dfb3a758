"""The SQLite queue's schema: its migrations, and opening a file as a queue database.

Opening says what a file is before it changes anything in it: a file that is not SQLite, an
SQLite database of something else (tables that are not ours, a user_version we never wrote)
or a damaged one gives a `StoreError` that names the file and what to do, and the file is
left as it was. A queue database of any earlier release is migrated in place.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite

from relay.errors import StoreError

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

# What migration 1 creates: a database with a user_version of ours has all of them.
TABLES = frozenset({"messages", "recipients", "attempts", "settings"})

_MOVE_IT = "point [queue].path elsewhere or move the file away"


async def connect(path: Path, *, create: bool = True) -> aiosqlite.Connection:
    """The queue database at `path`, configured and migrated to this release's schema.

    `create=False`: only an existing one (the CLI reading a queue the server never made).
    Rows come back as `sqlite3.Row`, read by column name.
    """
    if not create and not path.exists():  # noqa: ASYNC240 - one stat, before any I/O
        raise StoreError(f"no queue database at {path}; start `relay serve` once to create it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot open the queue database {path}: {exc}") from exc
    try:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        version = await _identify(conn, path)  # before anything writes to the file
        await conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk before it returns, so 250 means durable (also in WAL mode).
        await conn.execute("PRAGMA synchronous = FULL")
        await conn.execute("PRAGMA foreign_keys = ON")
        await _migrate(conn, version)
    except BaseException as exc:
        await conn.close()
        if isinstance(exc, sqlite3.Error):
            raise open_error(path, exc) from exc
        raise
    conn.row_factory = sqlite3.Row
    return conn


async def _identify(conn: aiosqlite.Connection, path: Path) -> int:
    """The schema version of a queue database (0: an empty file, a new queue); StoreError
    for any other file."""
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = int(row[0]) if row else 0
    async with conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' "
        "ESCAPE '\\'"
    ) as cur:
        tables = {str(r[0]) for r in await cur.fetchall()}
    if version == 0 and tables:
        raise StoreError(
            f"{path} is not a mailflow-relay queue database (an SQLite database with other "
            f"tables: {_names(tables)}); {_MOVE_IT}"
        )
    if version and not tables >= TABLES:
        raise StoreError(
            f"{path} is not a mailflow-relay queue database (an SQLite database with schema "
            f"version {version} but without the queue's tables); {_MOVE_IT}"
        )
    if version > len(MIGRATIONS):
        raise StoreError(
            f"{path} has schema version {version}, newer than this relay knows "
            f"({len(MIGRATIONS)}); upgrade mailflow-relay"
        )
    return version


def _names(tables: set[str], shown: int = 5) -> str:
    names = sorted(tables)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def open_error(path: Path, exc: sqlite3.Error) -> StoreError:
    """What to tell the user when opening the file failed with `exc`."""
    return file_error(path, exc) or StoreError(f"cannot open the queue database {path}: {exc}")


def file_error(path: Path, exc: sqlite3.Error) -> StoreError | None:
    """The error to raise when `exc` says the file is no SQLite database or a damaged one
    (found at opening, or later by a read of a damaged page); None for any other error."""
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_NOTADB":
        return StoreError(
            f"{path} is not a mailflow-relay queue database (not an SQLite file at all); {_MOVE_IT}"
        )
    if name == "SQLITE_CORRUPT":
        return StoreError(
            f"the queue database {path} is damaged ({exc}); move it away and restore it from "
            "a backup, or start with a new, empty queue"
        )
    return None


async def _migrate(conn: aiosqlite.Connection, version: int) -> None:
    """Run the migrations after `version`, each in a transaction with its version number."""
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {number}")
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
