"""The `relay` command line: the queue's JSON shape (a contract), the table, errors, help, and
swaks end to end against a running relay."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import Iterator
from email.header import Header
from pathlib import Path
from typing import Any

import pytest

from relay import __version__
from relay.server import Relay
from relay.spool.rows import LastError, Result
from relay.states import Change, Status
from tests.helpers import (
    CliResult,
    MakeConfig,
    StartRelay,
    TlsFiles,
    make_message,
    queued_id,
    require_program,
    require_swaks_tls,
    run_cli,
    run_cli_many,
    run_main,
    send_mail,
)

pytestmark = pytest.mark.timeout(60)

MESSAGE_KEYS = {"id", "message_id", "mail_from", "subject", "size", "received_at", "recipients"}
RECIPIENT_KEYS = {
    "address",
    "status",
    "connector",
    "attempts",
    "next_attempt_at",
    "expires_at",
    "delivered_at",
    "last_error",
}
LAST_ERROR_KEYS = {"code", "reply", "title", "server", "ip", "at"}
ATTEMPT_KEYS = {"at", "code", "reply", "server", "ip"}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
REFUSED = (
    "450 4.4.316 Connection refused [Message=Socket error code 10061] "
    "[LastAttemptedServerName=mail.onprem.contoso.test] [LastAttemptedIP=127.0.0.1:2526]"
)
LONG_LOCAL = "a-very-long-local-part-that-keeps-going-and-going-and-going-on-and-on"


async def cli(*args: str, relay: Relay) -> CliResult:
    """`python -m relay` against a running in-process relay's queue (the relay keeps serving)."""
    return await asyncio.to_thread(run_cli, *args, config=relay.loaded.source)


async def main(*args: str, relay: Relay) -> CliResult:
    """The same through relay.cli.main in this process (no start-up cost)."""
    return await asyncio.to_thread(run_main, *args, config=relay.loaded.source)


def config_of(relay: Relay) -> str:
    return relay.loaded.source


async def populated(relay: Relay) -> dict[str, int]:
    """Three messages: one queued, one delivered, one deferred with an error."""
    assert relay.store is not None
    ids = {
        "queued": queued_id(
            await send_mail(
                relay.port,
                rcpt_tos=["alice@contoso.test", "ops@onprem.contoso.test"],
                content=make_message(subject=Header("Grüße", "utf-8").encode()),
            )
        ),
        "delivered": queued_id(await send_mail(relay.port, rcpt_tos=["admin@contoso.test"])),
        "deferred": queued_id(
            await send_mail(
                relay.port,
                rcpt_tos=[f"{LONG_LOCAL}@onprem.contoso.test"],
                mail_from=f"{LONG_LOCAL}@fabrikam.test",
                content=make_message(subject="A subject line that is much too long " * 4),
            )
        ),
    }
    now = relay.clock.now()
    delivered = await relay.store.get_message(ids["delivered"])
    deferred = await relay.store.get_message(ids["deferred"])
    assert delivered is not None and deferred is not None
    error = LastError(
        code="4.4.316",
        reply=REFUSED,
        title="Connection refused",
        server="mail.onprem.contoso.test",
        ip="127.0.0.1:2526",
        at=now,
    )
    await relay.store.record(
        [
            Result(
                delivered.recipients[0].id,
                Status.QUEUED,
                Change(Status.DELIVERED, None, attempted=True),
                now,
                "mailbox",
            ),
            Result(
                deferred.recipients[0].id,
                Status.QUEUED,
                Change(Status.DEFERRED, now + 60, attempted=True),
                now,
                "To on-premises",
                error,
            ),
        ]
    )
    return ids


def assert_message_shape(message: dict[str, Any], *, history: bool = False) -> None:
    assert set(message) == MESSAGE_KEYS
    assert isinstance(message["id"], int)
    assert isinstance(message["size"], int)
    assert ISO_UTC.match(message["received_at"]), message["received_at"]
    assert message["recipients"], "a message has recipients"
    for recipient in message["recipients"]:
        assert set(recipient) == RECIPIENT_KEYS | ({"history"} if history else set())
        assert recipient["status"] in {s.value for s in Status}
        assert isinstance(recipient["attempts"], int)
        for key in ("next_attempt_at", "expires_at", "delivered_at"):
            value = recipient[key]
            assert value is None or ISO_UTC.match(value), (key, value)
        assert ISO_UTC.match(recipient["expires_at"])
        error = recipient["last_error"]
        if error is not None:
            assert set(error) == LAST_ERROR_KEYS
            assert ISO_UTC.match(error["at"])
        for attempt in recipient.get("history", []):
            assert set(attempt) == ATTEMPT_KEYS
            assert ISO_UTC.match(attempt["at"])


async def test_queue_list_json_shape(relay_server: Relay) -> None:
    ids = await populated(relay_server)
    code, out, err = await cli("queue", "list", "--all", "--json", relay=relay_server)
    assert (code, err) == (0, "")
    messages = json.loads(out)
    assert [m["id"] for m in messages] == [ids["queued"], ids["delivered"], ids["deferred"]]
    for message in messages:
        assert_message_shape(message)
    first, delivered, deferred = messages
    assert first["subject"] == "Grüße"
    assert first["mail_from"] == "sender@fabrikam.test"
    assert first["message_id"].startswith("<") and first["message_id"].endswith(">")
    assert first["received_at"] == "2027-01-15T08:00:00Z"  # the ManualClock's start
    alice, ops = first["recipients"]
    assert alice == {
        "address": "alice@contoso.test",
        "status": "queued",
        "connector": "mailbox",
        "attempts": 0,
        "next_attempt_at": "2027-01-15T08:00:00Z",
        "expires_at": "2027-01-17T08:00:00Z",  # 48 hours
        "delivered_at": None,
        "last_error": None,
    }
    assert ops["connector"] == "To on-premises"
    [admin] = delivered["recipients"]
    assert (admin["status"], admin["delivered_at"], admin["next_attempt_at"]) == (
        "delivered",
        "2027-01-15T08:00:00Z",
        None,
    )
    [slow] = deferred["recipients"]
    assert slow["status"] == "deferred"
    assert slow["attempts"] == 1
    assert slow["next_attempt_at"] == "2027-01-15T08:01:00Z"
    assert slow["last_error"] == {
        "code": "4.4.316",
        "reply": REFUSED,
        "title": "Connection refused",
        "server": "mail.onprem.contoso.test",
        "ip": "127.0.0.1:2526",
        "at": "2027-01-15T08:00:00Z",
    }


async def test_queue_list_status_filter_and_limit(relay_server: Relay) -> None:
    ids = await populated(relay_server)
    listed = []
    for args in (
        (),  # mail not yet finished (issue 12)
        ("--all",),
        ("--status", "queued"),
        ("--status", "delivered"),
        ("--status", "deferred"),
        ("--status", "failed"),
        ("--status", "queued", "--status", "delivered"),
        ("--all", "--limit", "2"),
        ("--limit", "1"),
        ("--connector", "To on-premises"),
        ("--connector", "mailbox", "--status", "delivered"),
        ("--to", "ALICE@contoso.test"),
        ("--from", "sender@fabrikam.test", "--all"),
        ("--from", "nobody@fabrikam.test", "--all"),
    ):
        code, out, err = await main("queue", "list", *args, "--json", relay=relay_server)
        assert (code, err) == (0, ""), args
        listed.append([m["id"] for m in json.loads(out)])
    queued, delivered, deferred = ids["queued"], ids["delivered"], ids["deferred"]
    assert listed == [
        [queued, deferred],
        [queued, delivered, deferred],
        [queued],
        [delivered],
        [deferred],
        [],
        [queued, delivered],
        [delivered, deferred],  # the newest two, still newest last
        [deferred],
        [queued, deferred],  # the first has a recipient for on-premises too
        [delivered],
        [queued],
        [queued, delivered],  # the default sender of tests.helpers.send_mail
        [],
    ]


async def test_queue_list_says_when_nothing_is_listed_and_what_it_read(
    relay_server: Relay,
) -> None:
    config = relay_server.loaded.source
    database = relay_server.loaded.path(relay_server.config.queue.path)
    code, out, err = await main("queue", "list", relay=relay_server)
    assert (code, err) == (0, "")
    assert out.startswith("Mail queue is empty: read ") and str(database) in out and config in out
    assert "--all" in out
    code, out, _ = await main("queue", "list", "--to", "x@contoso.test", relay=relay_server)
    assert out.startswith("No messages match --to x@contoso.test: read ")
    code, out, _ = await main("queue", "digest", relay=relay_server)
    assert f"Nothing pending: read {database} (config: {config})" in out
    code, out, _ = await main("alerts", relay=relay_server)
    assert out.startswith("No mail flow alerts") and f"(read {database} (config: {config}))" in out


async def test_queue_retry_of_a_finished_message_says_so_and_exits_1(relay_server: Relay) -> None:
    ids = await populated(relay_server)
    code, out, err = await main("queue", "retry", str(ids["delivered"]), relay=relay_server)
    assert (code, out) == (1, "")
    assert err.strip() == (
        f"relay: message {ids['delivered']} is finished (delivered): there is nothing to retry"
    )
    database = relay_server.loaded.path(relay_server.config.queue.path)
    code, out, err = await main("queue", "hold", str(ids["delivered"]), relay=relay_server)
    assert code == 0 and "nothing to hold" in out and str(database) in out
    code, out, err = await main("queue", "retry", str(ids["deferred"]), relay=relay_server)
    assert (code, err) == (0, "")
    assert out.strip() == f"1 recipient(s) of message {ids['deferred']} due now"


async def test_queue_show_json(relay_server: Relay) -> None:
    ids = await populated(relay_server)
    code, out, err = await cli("queue", "show", str(ids["deferred"]), "--json", relay=relay_server)
    _, listed, _ = await main("queue", "list", "--all", "--json", relay=relay_server)
    assert (code, err) == (0, "")
    shown = json.loads(out)
    assert_message_shape(shown, history=True)
    [recipient] = shown["recipients"]
    assert recipient["history"] == [
        {
            "at": "2027-01-15T08:00:00Z",
            "code": "4.4.316",
            "reply": REFUSED,
            "server": "mail.onprem.contoso.test",
            "ip": "127.0.0.1:2526",
        }
    ]
    # Apart from the history, the same as in the list.
    del recipient["history"]
    assert shown == json.loads(listed)[2]


async def test_queue_show_unknown_id(relay_server: Relay) -> None:
    await send_mail(relay_server.port)
    code, out, err = await main("queue", "show", "999", relay=relay_server)
    assert code == 1
    assert out == ""
    database = relay_server.loaded.path(relay_server.config.queue.path)
    assert err.strip() == (
        f"relay: no message with ID 999 in the queue {database} "
        f"(config: {relay_server.loaded.source}) (see `relay queue list --all`)"
    )


async def test_queue_table_piped_is_whole(relay_server: Relay) -> None:
    """Piped, nothing is cut or wrapped (issue 12): the long sender and the last error with
    its LastAttemptedServerName come whole, each on its line."""
    ids = await populated(relay_server)
    code, out, err = await main("queue", "list", relay=relay_server)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert f"({REFUSED})" in [line.strip() for line in lines]
    assert any(f"  {LONG_LOCAL}@fabrikam.test  (queued " in line for line in lines), out
    assert "…" not in out
    assert lines[0].startswith("ID")
    assert any(line.startswith(str(ids["queued"])) for line in lines)
    assert any("alice@contoso.test" in line for line in lines)
    assert any("4.4.316" in line for line in lines)
    assert lines[-1].startswith("-- 2 messages, 3 recipients (1 deferred, 2 queued)")
    # The human detail view as well.
    code, out, _ = await main("queue", "show", str(ids["deferred"]), relay=relay_server)
    assert code == 0
    assert f"Queue ID:     {ids['deferred']}" in out
    assert REFUSED in out


def test_queue_list_before_the_database_exists(tmp_path: Path, make_config: MakeConfig) -> None:
    config = make_config()
    database = tmp_path / "queue" / "relay.db"
    as_json = run_cli("queue", "list", "--json", config=config)
    table = run_main("queue", "list", config=config)
    show = run_main("queue", "show", "1", config=config)
    assert as_json == (0, "[]\n", "")
    assert (table.code, table.stderr) == (0, "")
    assert table.stdout.startswith("Mail queue is empty: read ")
    assert f"{database} (config: {config})" in table.stdout
    assert show.code == 1
    assert "no message with ID 1" in show.stderr
    assert not database.exists(), "reading the queue must not create it"


def test_help_and_version() -> None:
    helps = [("--help",), ("queue", "--help"), ("queue", "list", "--help"), ("config", "--help")]
    real_help, version = run_cli_many(helps[0], ("--version",))
    results = [real_help, *(run_main(*args) for args in helps[1:])]
    for args, (code, out, err) in zip(helps, results, strict=True):
        assert code == 0, (args, err)
        assert out.startswith("usage: relay"), out
    for command in ("serve", "health", "config", "queue"):
        assert command in results[0].stdout
    assert (version.code, version.stdout.strip()) == (0, f"mailflow-relay {__version__}")


def test_bad_arguments_exit_2_without_traceback(make_config: MakeConfig) -> None:
    calls = [("queue", "list", "--status", "bogus"), ("queue", "show", "abc"), ("frobnicate",)]
    config = make_config()
    for args in calls:
        code, _, err = run_main(*args, config=config)
        assert code == 2, args
        assert "usage: relay" in err
        assert "Traceback" not in err


# ---- swaks end to end -----------------------------------------------------------------------


async def swaks(*args: str) -> tuple[int, str]:
    program = require_program("swaks")
    process = await asyncio.create_subprocess_exec(
        program,
        "--from",
        "sender@fabrikam.test",
        "--helo",
        "client.fabrikam.test",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode("utf-8", errors="replace")


@pytest.mark.swaks
async def test_swaks_end_to_end(relay_server: Relay) -> None:
    code, out = await swaks(
        "--to", "alice@contoso.test", "--server", f"127.0.0.1:{relay_server.port}"
    )
    assert code == 0, out
    accepted = re.search(r"^<-  (250 2\.6\.0 .*)$", out, re.M)
    assert accepted, out
    queue_id = queued_id(accepted.group(1).strip())
    code, table, err = await cli("queue", "list", relay=relay_server)
    assert (code, err) == (0, "")
    assert any(line.startswith(str(queue_id)) for line in table.splitlines())
    assert "alice@contoso.test" in table


@pytest.mark.swaks
async def test_swaks_rejected_recipient(relay_server: Relay) -> None:
    code, out = await swaks(
        "--to", "bob@contoso.test", "--server", f"127.0.0.1:{relay_server.port}"
    )
    assert code != 0
    assert "<** 550 5.4.1 Recipient address rejected: Access denied" in out


@pytest.mark.swaks
async def test_swaks_starttls(start_relay: StartRelay, tls_files: TlsFiles) -> None:
    require_swaks_tls()
    relay = await start_relay(smtp=tls_files.smtp_overrides(require_tls=True))
    code, out = await swaks(
        "--to", "alice@contoso.test", "--server", f"127.0.0.1:{relay.port}", "--tls"
    )
    assert code == 0, out
    assert "STARTTLS" in out
    assert "TLS started" in out
    assert "250 2.6.0 <" in out


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("relay",)
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from _commands(child, (*path, name))


def test_every_argument_has_help_and_every_command_an_example() -> None:
    """Issue 12, section 6: no option or positional without help text; each command's
    --help ends with an example that runs the command it documents."""
    from relay.cli import _parser

    commands = list(_commands(_parser()))
    assert len(commands) > 30
    for path, parser in commands:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, (path, action.dest)
        assert parser.epilog and parser.epilog.startswith("example:\n  "), path
        example = parser.epilog.split("\n  ", 1)[1].replace("--config lab.toml ", "")
        assert example.startswith(" ".join(path)), (path, example)
    for path in ((), ("connector", "enable"), ("queue", "show"), ("mailbox", "show")):
        code, out, _ = run_main(*path, "--help")
        assert code == 0
        assert out.rstrip().splitlines()[-2:][0] == "example:", out
    top = run_main("connector", "--help").stdout
    assert "enable a connector: mail for its domains goes through it again" in top
    assert "disable a connector: its mail then routes by MX" in top


def test_dash_capital_v_is_version() -> None:
    (short,) = run_cli_many(("-V",))
    assert (short.code, short.stdout.strip()) == (0, f"mailflow-relay {__version__}")
