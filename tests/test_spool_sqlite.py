"""The SQLite backend's own promises: a file that is not a queue database is named and left as
it was, a queue database of an earlier release migrates, the stored setting keys keep their
text, and rows are read by column name.

Real SQLite files in tmp_path; the CLI runs in-process (`run_main`) on the same files.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest

from relay.config import DomainType
from relay.errors import StoreError
from relay.spool import schema
from relay.spool.reads import recipient_row
from relay.spool.settings import ALERT_NOTIFIED, CLOCK_OFFSET, CONNECTOR_ENABLED, DOMAIN_TYPE
from relay.spool.sqlite import open_spool
from relay.states import Status
from tests.helpers import run_main, write_config

T0 = 1_800_000_000.0
MOVE_IT = "point [queue].path elsewhere or move the file away"


def sqlite_file(path: Path, *statements: str) -> Path:
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path


def unchanged(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before, "the file was changed"
    assert not Path(f"{path}-wal").exists(), "the file was opened for writing (WAL)"


# ---- what the file is ---------------------------------------------------------------------


async def test_a_file_that_is_not_sqlite_is_named_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    path.write_bytes(b"From: someone\r\n\r\nan mbox, not a queue\r\n" * 200)
    before = path.read_bytes()
    with pytest.raises(StoreError) as caught:
        await open_spool(path)
    assert str(caught.value) == (
        f"{path} is not a mailflow-relay queue database (not an SQLite file at all); {MOVE_IT}"
    )
    unchanged(path, before)


async def test_an_sqlite_database_of_something_else_is_named_and_left_alone(
    tmp_path: Path,
) -> None:
    path = sqlite_file(
        tmp_path / "relay.db",
        "CREATE TABLE contacts (name TEXT)",
        "CREATE TABLE notes (body TEXT)",
        "INSERT INTO contacts VALUES ('alice')",
    )
    before = path.read_bytes()
    with pytest.raises(StoreError) as caught:
        await open_spool(path)
    assert str(caught.value) == (
        f"{path} is not a mailflow-relay queue database (an SQLite database with other "
        f"tables: contacts, notes); {MOVE_IT}"
    )
    unchanged(path, before)


async def test_a_user_version_without_our_tables_is_not_ours(tmp_path: Path) -> None:
    """Another program's database that numbers its own schema."""
    path = sqlite_file(tmp_path / "relay.db", "CREATE TABLE t (x)", "PRAGMA user_version = 2")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="schema version 2 but without the queue's tables"):
        await open_spool(path)
    unchanged(path, before)


async def test_a_newer_queue_database_asks_for_an_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    spool = await open_spool(path)
    await spool.close()
    sqlite_file(path, f"PRAGMA user_version = {len(schema.MIGRATIONS) + 5}")
    with pytest.raises(StoreError) as caught:
        await open_spool(path)
    assert str(caught.value) == (
        f"{path} has schema version {len(schema.MIGRATIONS) + 5}, newer than this relay "
        f"knows ({len(schema.MIGRATIONS)}); upgrade mailflow-relay"
    )


async def test_a_damaged_queue_database_says_so(tmp_path: Path) -> None:
    """Every page but the first overwritten: found when opening or by the first read."""
    path = tmp_path / "relay.db"
    spool = await open_spool(path)
    await spool.close()
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:] = b"\xa5" * (len(data) - page)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"is damaged \(.*\); move it away and restore it"):
        spool = await open_spool(path)
        try:
            await spool.list_messages()
        finally:
            await spool.close()


@pytest.mark.parametrize("command", [("queue", "list"), ("queue", "hold", "1"), ("clock", "show")])
def test_the_cli_names_a_foreign_queue_file_without_a_traceback(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    config = write_config(tmp_path)
    queue = tmp_path / "queue" / "relay.db"
    queue.parent.mkdir(parents=True, exist_ok=True)
    queue.write_bytes(b"\x00not a database\x00" * 300)
    result = run_main(*command, config=config)
    assert result.code == 1, result
    assert result.stderr == (
        f"relay: {queue} is not a mailflow-relay queue database (not an SQLite file at all); "
        f"{MOVE_IT}\n"
    )


# ---- an earlier release's queue -----------------------------------------------------------


@pytest.mark.parametrize("version", range(1, len(schema.MIGRATIONS)))
async def test_a_queue_of_an_earlier_schema_migrates_and_reads(
    tmp_path: Path, version: int
) -> None:
    path = tmp_path / "relay.db"
    conn = sqlite3.connect(path)
    for script in schema.MIGRATIONS[:version]:
        conn.executescript(script)
    conn.execute(f"PRAGMA user_version = {version}")
    error = {
        "code": "4.4.316",
        "reply": "450 4.4.316 Connection refused",
        "title": "Connection refused",
        "server": "onprem.contoso.test",
        "ip": "192.0.2.1",
        "at": T0 + 60,
    }
    conn.execute(
        "INSERT INTO messages VALUES (7, '<7@test>', 'a@fabrikam.test', 'old', 5, ?, "
        "'127.0.0.1', 'client', x'6f6c640d0a')",
        (T0,),
    )
    conn.execute(
        "INSERT INTO recipients (id, message, address, status, connector, attempts, "
        "next_attempt_at, expires_at, last_error) VALUES "
        "(1, 7, 'bob@onprem.contoso.test', 'deferred', 'To on-premises', 1, ?, ?, ?)",
        (T0 + 360, T0 + 86400, json.dumps(error)),
    )
    conn.execute("INSERT INTO settings VALUES ('clock.offset', '3600.0')")
    conn.commit()
    conn.close()

    spool = await open_spool(path)
    try:
        assert (await spool.query("PRAGMA user_version")) == [(len(schema.MIGRATIONS),)]
        message = await spool.get_message(7)
        assert message is not None and message.subject == "old"
        (recipient,) = message.recipients
        assert recipient.status is Status.DEFERRED
        assert recipient.last_error is not None and recipient.last_error.code == "4.4.316"
        (row,) = await spool.digest()
        assert (row.code, row.deferred, row.last_error) == ("4.4.316", 1, recipient.last_error)
        assert await spool.get_setting(CLOCK_OFFSET) == 3600.0
        assert spool.reserve_id() == 8
    finally:
        await spool.close()


async def test_reopening_a_current_queue_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    spool = await open_spool(path)
    await spool.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = tuple(conn.execute("SELECT count(*) FROM sqlite_master").fetchone())
    again = await open_spool(path, create=False)
    try:
        assert await again.query("SELECT count(*) FROM sqlite_master") == [tables]
    finally:
        await again.close()


async def test_no_database_and_create_false(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "relay.db"
    with pytest.raises(StoreError, match=r"no queue database at .*; start `relay serve` once"):
        await open_spool(path, create=False)
    assert not path.parent.exists()


# ---- settings keep their stored text -------------------------------------------------------


async def test_setting_keys_and_values_are_stored_as_every_release_stored_them(
    tmp_path: Path,
) -> None:
    spool = await open_spool(tmp_path / "relay.db")
    try:
        await spool.set_setting(CLOCK_OFFSET, 3600.0)
        await spool.set_setting(DOMAIN_TYPE("onprem.contoso.test"), DomainType.AUTHORITATIVE)
        await spool.set_setting(CONNECTOR_ENABLED("To on-premises"), False)
        await spool.set_setting(CONNECTOR_ENABLED("Partner"), True)
        await spool.set_setting(ALERT_NOTIFIED("To on-premises"), T0 + 0.5)
        assert await spool.query("SELECT key, value FROM settings ORDER BY key") == [
            ("alert.notified:To on-premises", repr(T0 + 0.5)),
            ("clock.offset", "3600.0"),
            ("connector.enabled:Partner", "true"),
            ("connector.enabled:To on-premises", "false"),
            ("domain.type:onprem.contoso.test", "authoritative"),
        ]
    finally:
        await spool.close()


# ---- rows by column name ------------------------------------------------------------------


def test_a_recipient_is_read_by_column_name_whatever_the_order(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "rows.db")
    conn.row_factory = sqlite3.Row
    row = conn.execute(
        "SELECT 0 AS ndr_due, NULL AS last_error, NULL AS delivered_at, ? AS expires_at, "
        "? AS next_attempt_at, 2 AS attempts, 'Partner' AS connector, 'deferred' AS status, "
        "'u@partner.test' AS address, 9 AS message, 4 AS id, 'ignored' AS extra",
        (T0 + 86400, T0 + 60),
    ).fetchone()
    recipient = recipient_row(row)
    assert (recipient.id, recipient.message, recipient.address) == (4, 9, "u@partner.test")
    assert (recipient.status, recipient.connector, recipient.attempts) == (
        Status.DEFERRED,
        "Partner",
        2,
    )
    assert (recipient.next_attempt_at, recipient.expires_at) == (T0 + 60, T0 + 86400)
    conn.close()
