"""Issue 4, sections 1 and 3: the queue digest and actions, runtime policy and Fix now.

Most tests drive an in-process relay (ManualClock, `run_once()`) and call the CLI as a
subprocess on the same queue file, which is the contract a lab administrator uses. The
`running` tests start `relay serve` as a subprocess and check that it acts on each change
within two seconds; the `stopped` test acts on the queue file with no server at all.
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.server import Relay
from tests.delivery_support import (
    ClosedPort,
    advance,
    closed_port,
    maildir_messages,
    manual_relay,
    run_once,
)
from tests.helpers import (
    CliResult,
    example_data,
    queued_id,
    run_cli,
    run_main,
    send_mail,
    send_mail_sync,
    smtp_client,
    wait_for,
)
from tests.ops_support import (
    ACCESS_DENIED,
    ADMIN,
    NOT_FOUND,
    ON_PREMISES,
    SENDER,
    assert_fits,
    assert_uncut,
    cli,
    cli_json,
    closed_connectors,
    epoch,
    main_json,
    ndr_statuses,
    ok,
    ops_config,
    parse_json,
    run_in_terminal,
    served,
    serving_config,
    statuses,
)

pytestmark = pytest.mark.timeout(90)

PARTNER = "Partner fabrikam"
DIGEST_KEYS = {
    "connector",
    "status",
    "code",
    "messages",
    "recipients",
    "queue_started_at",
    "next_retry_at",
    "oldest_expires_at",
    "last_error",
    "server",
    "ip",
}
EXPIRATION = 48 * 3600
ACTIONS = ("retry", "hold", "release", "expire", "delete")


@pytest.fixture
def partner() -> Iterator[ClosedPort]:
    with closed_port() as port:
        yield port


@pytest.fixture
def config(tmp_path: Path, onprem: ClosedPort, partner: ClosedPort) -> Path:
    return ops_config(tmp_path, onprem, connectors=closed_connectors(onprem, partner))


@pytest.fixture
async def relay(config: Path) -> AsyncIterator[Relay]:
    async with manual_relay(config) as started:
        yield started


async def submit(relay: Relay, *rcpts: str, mail_from: str = SENDER) -> int:
    return queued_id(await send_mail(relay.port, rcpt_tos=list(rcpts), mail_from=mail_from))


async def recipients(relay: Relay, message_id: int) -> list[dict[str, Any]]:
    found = await main_json("queue", "show", str(message_id), config=relay.loaded.source)
    return found["recipients"]  # type: ignore[no-any-return]


def mailbox_root(relay_or_config: Relay | Path) -> Path:
    if isinstance(relay_or_config, Relay):
        return relay_or_config.loaded.path(relay_or_config.config.mailboxes.path)
    return relay_or_config.parent / "queue" / "mailboxes"


# ---- the digest -------------------------------------------------------------------------


async def test_digest_has_one_row_per_route_and_code(relay: Relay) -> None:
    first = await submit(relay, "bob@onprem.contoso.test")
    await submit(relay, "carol@onprem.contoso.test", "dan@onprem.contoso.test")
    held = await submit(relay, "erin@fabrikam.test")
    await submit(relay, "alice@contoso.test")  # delivered: not in the digest
    await run_once(relay)
    fresh = await submit(relay, "frank@onprem.contoso.test")  # not tried yet: no code
    config = relay.loaded.source
    ok(await cli("queue", "hold", str(held), config=config))

    rows = await cli_json("queue", "digest", config=config)
    assert all(set(row) == DIGEST_KEYS for row in rows), rows
    by_key = {(row["connector"], row["code"]): row for row in rows}
    assert set(by_key) == {(ON_PREMISES, "4.4.316"), (ON_PREMISES, None), (PARTNER, "4.4.316")}

    refused = by_key[ON_PREMISES, "4.4.316"]
    assert (refused["status"], refused["messages"], refused["recipients"]) == ("retry", 2, 3)
    received = (await main_json("queue", "show", str(first), config=config))["received_at"]
    assert refused["queue_started_at"] == received
    assert epoch(refused["oldest_expires_at"]) == epoch(received) + EXPIRATION
    assert epoch(refused["next_retry_at"]) > epoch(received)
    assert refused["last_error"].startswith("450 4.4.316 Connection refused [Message=")
    assert refused["ip"] and refused["ip"].startswith("127.0.0.1:")
    assert refused["server"]

    waiting = by_key[ON_PREMISES, None]
    assert (waiting["status"], waiting["messages"], waiting["recipients"]) == ("ready", 1, 1)
    assert waiting["last_error"] is waiting["server"] is waiting["ip"] is None
    fresh_row = (await main_json("queue", "show", str(fresh), config=config))["recipients"][0]
    assert waiting["next_retry_at"] == fresh_row["next_attempt_at"]

    suspended = by_key[PARTNER, "4.4.316"]
    assert (suspended["status"], suspended["messages"], suspended["next_retry_at"]) == (
        "suspended",
        1,
        None,
    )

    table = ok(await cli("queue", "digest", config=config)).stdout
    assert_uncut(table)
    for name in (ON_PREMISES, PARTNER, "4.4.316", "retry", "ready", "suspended"):
        assert name in table, table
    assert "450 4.4.316 Connection refused" in table


# ---- retry, hold, release, expire, delete --------------------------------------------------


async def test_retry_by_id_connector_and_all_makes_recipients_due_now(relay: Relay) -> None:
    onprem = await submit(relay, "bob@onprem.contoso.test")
    fabrikam = await submit(relay, "erin@fabrikam.test")
    await run_once(relay)
    config = relay.loaded.source
    later = {m: (await recipients(relay, m))[0]["next_attempt_at"] for m in (onprem, fabrikam)}

    before = time.time()
    result = ok(await cli("queue", "retry", str(onprem), config=config))
    assert f"1 recipient(s) of message {onprem} due now" in result.stdout
    moved = (await recipients(relay, onprem))[0]
    assert before - 1 <= epoch(moved["next_attempt_at"]) <= time.time() + 1
    assert (await recipients(relay, fabrikam))[0]["next_attempt_at"] == later[fabrikam]
    await run_once(relay)
    assert (await recipients(relay, onprem))[0]["attempts"] == 2
    assert (await recipients(relay, fabrikam))[0]["attempts"] == 1

    before = time.time()
    ok(await cli("queue", "retry", "--connector", PARTNER, config=config))
    moved = (await recipients(relay, fabrikam))[0]
    assert before - 1 <= epoch(moved["next_attempt_at"]) <= time.time() + 1
    assert epoch((await recipients(relay, onprem))[0]["next_attempt_at"]) > time.time()
    await run_once(relay)
    assert [(await recipients(relay, m))[0]["attempts"] for m in (onprem, fabrikam)] == [2, 2]

    counted = await cli_json("queue", "retry", "--all", config=config)
    assert counted == {"action": "retry", "recipients": 2}
    await run_once(relay)
    assert [(await recipients(relay, m))[0]["attempts"] for m in (onprem, fabrikam)] == [3, 3]


async def test_held_recipient_is_neither_tried_nor_expired(relay: Relay) -> None:
    queue_id = await submit(relay, "bob@onprem.contoso.test")
    await run_once(relay)
    config = relay.loaded.source
    result = ok(await cli("queue", "hold", str(queue_id), config=config))
    assert f"message {queue_id}: 1 recipient(s) held" in result.stdout
    (row,) = await recipients(relay, queue_id)
    assert (row["status"], row["next_attempt_at"], row["attempts"]) == ("held", None, 1)

    advance(relay, EXPIRATION + 3600)  # well past its expiry
    await run_once(relay)
    (row,) = await recipients(relay, queue_id)
    assert (row["status"], row["attempts"]) == ("held", 1)
    assert maildir_messages(mailbox_root(relay), SENDER) == []

    # Released after its expiry, it expires at once (as Postfix bounces old released mail).
    ok(await cli("queue", "release", str(queue_id), config=config))
    await run_once(relay)
    (row,) = await recipients(relay, queue_id)
    assert row["status"] == "expired"
    assert ndr_statuses(mailbox_root(relay), SENDER) == ["5.4.316"]


async def test_release_makes_a_held_recipient_due_again(relay: Relay) -> None:
    queue_id = await submit(relay, "bob@onprem.contoso.test")
    await run_once(relay)
    config = relay.loaded.source
    ok(await cli("queue", "hold", str(queue_id), config=config))
    before = time.time()
    released = await cli_json("queue", "release", str(queue_id), config=config)
    assert released == {"action": "release", "id": queue_id, "changed": 1}
    (row,) = await recipients(relay, queue_id)
    assert row["status"] == "deferred"
    assert before - 1 <= epoch(row["next_attempt_at"]) <= time.time() + 1
    await run_once(relay)
    (row,) = await recipients(relay, queue_id)
    assert (row["status"], row["attempts"]) == ("deferred", 2)


async def test_expire_fails_the_recipient_and_sends_the_ndr(relay: Relay) -> None:
    queue_id = await submit(relay, "bob@onprem.contoso.test")
    await run_once(relay)
    result = ok(await cli("queue", "expire", str(queue_id), config=relay.loaded.source))
    assert "expired" in result.stdout
    await run_once(relay)
    (row,) = await recipients(relay, queue_id)
    assert row["status"] == "expired"
    assert row["last_error"]["reply"] == "550 5.4.316 Message expired, connection refused"
    assert ndr_statuses(mailbox_root(relay), SENDER) == ["5.4.316"]


async def test_delete_removes_the_message_without_an_ndr(relay: Relay) -> None:
    queue_id = await submit(relay, "bob@onprem.contoso.test")
    await run_once(relay)
    config = relay.loaded.source
    result = ok(await cli("queue", "delete", str(queue_id), config=config))
    assert "deleted without an NDR" in result.stdout
    gone = await cli("queue", "show", str(queue_id), config=config)
    assert gone.code == 1
    assert f"no message with ID {queue_id}" in gone.stderr
    advance(relay, EXPIRATION + 60)
    await run_once(relay)
    assert maildir_messages(mailbox_root(relay), SENDER) == []
    assert await cli_json("queue", "digest", config=config) == []


@pytest.mark.parametrize("action", ACTIONS)
def test_an_unknown_id_exits_1_with_a_clear_message(config: Path, action: str) -> None:
    result = run_cli("queue", action, "4242", config=config)
    assert result.code == 1, result
    assert result.stderr.strip() == (
        "relay: no message with ID 4242 in the queue (see `relay queue list`)"
    )
    assert "Traceback" not in result.stderr


def test_retry_of_an_unknown_connector_exits_1(config: Path) -> None:
    result = run_cli("queue", "retry", "--connector", "Nope", config=config)
    assert result.code == 1
    assert "no connector named 'Nope'" in result.stderr
    assert ON_PREMISES in result.stderr


async def test_actions_work_with_the_server_stopped(config: Path) -> None:
    async with manual_relay(config) as relay:
        kept = await submit(relay, "bob@onprem.contoso.test")
        dropped = await submit(relay, "carol@onprem.contoso.test")
        await run_once(relay)

    def state(message_id: int) -> dict[str, Any]:
        return parse_json(run_cli("queue", "show", str(message_id), "--json", config=config))  # type: ignore[no-any-return]

    ok(run_cli("queue", "hold", str(kept), config=config))
    assert statuses(state(kept)) == ["held"]
    ok(run_cli("queue", "release", str(kept), config=config))
    assert statuses(state(kept)) == ["deferred"]
    ok(run_cli("queue", "retry", "--all", config=config))
    assert epoch(state(kept)["recipients"][0]["next_attempt_at"]) <= time.time()
    ok(run_cli("queue", "expire", str(kept), config=config))
    ok(run_cli("queue", "delete", str(dropped), config=config))
    assert run_cli("queue", "show", str(dropped), config=config).code == 1

    async with manual_relay(config) as relay:  # the next start acts on what was asked
        await run_once(relay)
        assert statuses(state(kept)) == ["expired"]
        assert ndr_statuses(mailbox_root(relay), SENDER) == ["5.4.316"]


# ---- a running server acts within two seconds ----------------------------------------------

ACT_WITHIN = 2.0


def deferred_messages(port: int, config: Path, count: int) -> list[int]:
    ids = [
        queued_id(send_mail_sync(port, rcpt_tos=[f"user{n}@onprem.contoso.test"], mail_from=SENDER))
        for n in range(count)
    ]
    for message_id in ids:
        wait_for(
            lambda m=message_id: _attempts(config, m) >= 1,
            timeout=10,
            what=f"message {message_id} deferred once",
        )
    return ids


def _show(config: Path, message_id: int) -> dict[str, Any]:
    return parse_json(run_main("queue", "show", str(message_id), "--json", config=config))  # type: ignore[no-any-return]


def _attempts(config: Path, message_id: int) -> int:
    return int(_show(config, message_id)["recipients"][0]["attempts"])


def _status(config: Path, message_id: int) -> str:
    return str(_show(config, message_id)["recipients"][0]["status"])


def acted(config: Path, check: Any, what: str) -> None:
    """`check()` becomes true within ACT_WITHIN seconds of the CLI command's return."""
    started = time.monotonic()
    wait_for(check, timeout=ACT_WITHIN, what=what, step=0.05)
    assert time.monotonic() - started <= ACT_WITHIN + 0.5, what


def test_a_running_server_acts_on_each_queue_action_within_2_seconds(
    tmp_path: Path, onprem: ClosedPort
) -> None:
    config = serving_config(tmp_path, onprem)
    with served(config) as server:
        retried, held, expired, deleted = deferred_messages(server.port, config, 4)

        ok(run_cli("queue", "retry", str(retried), config=config))
        acted(config, lambda: _attempts(config, retried) >= 2, "retry: tried again")

        ok(run_cli("queue", "hold", str(held), config=config))
        assert _status(config, held) == "held"
        ok(run_cli("queue", "release", str(held), config=config))
        acted(config, lambda: _attempts(config, held) >= 2, "release: tried again")

        ok(run_cli("queue", "expire", str(expired), config=config))
        acted(
            config,
            lambda: (
                _status(config, expired) == "expired"
                and ndr_statuses(mailbox_root(config), SENDER) == ["5.4.316"]
            ),
            "expire: expired and the NDR in alice's Maildir",
        )

        ok(run_cli("queue", "delete", str(deleted), config=config))
        assert run_cli("queue", "show", str(deleted), config=config).code == 1
        assert ndr_statuses(mailbox_root(config), SENDER) == ["5.4.316"]


# ---- runtime policy: domains -------------------------------------------------------------


def _domain(views: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (view,) = [v for v in views if v["name"] == name]
    return view


async def test_domain_set_type_and_reset_next_to_the_config_value(config: Path) -> None:
    onprem = "onprem.contoso.test"
    views = await cli_json("domain", "list", config=config)
    assert _domain(views, onprem) == {
        "name": onprem,
        "type": "internal_relay",
        "config_type": "internal_relay",
        "changed": False,
        "mailboxes": [],
    }
    assert _domain(views, "contoso.test")["mailboxes"] == [ADMIN, SENDER]

    result = ok(await cli("domain", "set-type", onprem, "authoritative", config=config))
    assert onprem in result.stdout and "authoritative" in result.stdout
    view = _domain(await cli_json("domain", "list", config=config), onprem)
    assert (view["type"], view["config_type"], view["changed"]) == (
        "authoritative",
        "internal_relay",
        True,
    )
    table = ok(await cli("domain", "list", config=config)).stdout
    assert_uncut(table)
    assert "authoritative *" in table and "relay domain reset" in table

    async with manual_relay(config) as relay:  # survives a restart
        async with smtp_client(relay.port) as client:
            await client.mail(SENDER)
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await client.rcpt(f"nobody@{onprem}")
        assert f"{refused.value.code} {refused.value.message}" == ACCESS_DENIED

    ok(await cli("domain", "reset", config=config))
    view = _domain(await cli_json("domain", "list", config=config), onprem)
    assert (view["type"], view["changed"]) == ("internal_relay", False)
    async with manual_relay(config) as relay:
        await submit(relay, f"nobody@{onprem}")  # accepted again


def test_domain_commands_name_what_is_wrong(config: Path) -> None:
    unknown = run_cli("domain", "set-type", "fabrikam.test", "authoritative", config=config)
    assert unknown.code == 1
    assert "'fabrikam.test' is not an accepted domain" in unknown.stderr
    assert "contoso.test, onprem.contoso.test" in unknown.stderr
    bad_type = run_cli("domain", "set-type", "contoso.test", "external", config=config)
    assert bad_type.code == 2
    assert "authoritative" in bad_type.stderr and "Traceback" not in bad_type.stderr


# ---- runtime policy: connectors ----------------------------------------------------------


def _connector(views: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (view,) = [v for v in views if v["name"] == name]
    return view


async def test_connector_disable_reroutes_and_survives_a_restart(
    config: Path, onprem: ClosedPort
) -> None:
    view = _connector(await cli_json("connector", "list", config=config), ON_PREMISES)
    assert view == {
        "name": ON_PREMISES,
        "type": "on_premises",
        "enabled": True,
        "config_enabled": True,
        "changed": False,
        "recipient_domains": ["onprem.contoso.test"],
        "destination": f"127.0.0.1:{onprem.port}",
        "tls": "none",
    }
    async with manual_relay(config) as relay:
        queue_id = await submit(relay, "bob@onprem.contoso.test")
        await run_once(relay)
        assert (await recipients(relay, queue_id))[0]["connector"] == ON_PREMISES

        result = ok(await cli("connector", "disable", ON_PREMISES, config=config))
        assert "disabled" in result.stdout
        view = _connector(await cli_json("connector", "list", config=config), ON_PREMISES)
        assert (view["enabled"], view["config_enabled"], view["changed"]) == (False, True, True)
        table = ok(await cli("connector", "list", config=config)).stdout
        assert_uncut(table)
        assert "relay connector reset" in table

        await relay.refresh()  # what the running server's watcher does within a second
        await run_once(relay)  # disabling made its mail due now: it goes by MX
        (row,) = await recipients(relay, queue_id)
        assert row["connector"] == "mx"
        assert row["attempts"] == 2

    async with manual_relay(config) as relay:  # after a restart: still disabled
        assert not _connector_enabled(relay, ON_PREMISES)
        queue_id = await submit(relay, "carol@onprem.contoso.test")
        assert (await recipients(relay, queue_id))[0]["connector"] == "mx"

    ok(await cli("connector", "enable", ON_PREMISES, config=config))
    view = _connector(await cli_json("connector", "list", config=config), ON_PREMISES)
    assert (view["enabled"], view["changed"]) == (True, False)
    ok(await cli("connector", "disable", ON_PREMISES, config=config))
    result = ok(await cli("connector", "reset", config=config))
    assert ON_PREMISES in result.stdout
    view = _connector(await cli_json("connector", "list", config=config), ON_PREMISES)
    assert (view["enabled"], view["changed"]) == (True, False)
    async with manual_relay(config) as relay:
        assert _connector_enabled(relay, ON_PREMISES)


def _connector_enabled(relay: Relay, name: str) -> bool:
    return next(c.enabled for c in relay.policy.connectors if c.name == name)


def test_connector_commands_name_what_is_wrong(config: Path) -> None:
    for action in ("enable", "disable", "reset"):
        result = run_cli("connector", action, "To nowhere", config=config)
        assert result.code == 1, (action, result)
        assert "no connector named 'To nowhere'" in result.stderr
        assert f"'{ON_PREMISES}'" in result.stderr


# ---- Fix now -------------------------------------------------------------------------------


async def test_fix_now_makes_the_domain_authoritative_and_fails_unknown_queued_mail(
    relay: Relay,
) -> None:
    config = relay.loaded.source
    queue_id = await submit(relay, "bob@onprem.contoso.test")
    await run_once(relay)
    (alert,) = await cli_json("alerts", config=config)
    assert (alert["connector"], alert["code"], alert["fix_now"]) == (ON_PREMISES, "4.4.316", True)

    result = ok(await cli("alerts", "fix-now", ON_PREMISES, config=config))
    assert "onprem.contoso.test now authoritative" in result.stdout
    assert_fits(result.stdout.split(";")[0])
    view = _domain(await cli_json("domain", "list", config=config), "onprem.contoso.test")
    assert (view["type"], view["changed"]) == ("authoritative", True)

    await relay.refresh()  # what the running server's watcher does within a second
    async with smtp_client(relay.port) as client:
        await client.mail(SENDER)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("nobody@onprem.contoso.test")
    assert f"{refused.value.code} {refused.value.message}" == ACCESS_DENIED

    await run_once(relay)  # no clock move: Fix now made it due at once
    (row,) = await recipients(relay, queue_id)
    assert row["status"] == "failed"
    assert row["last_error"]["reply"] == NOT_FOUND
    assert ndr_statuses(mailbox_root(relay), SENDER) == ["5.1.10"]
    (bounce,) = maildir_messages(mailbox_root(relay), SENDER)
    assert NOT_FOUND in bounce.as_string()
    assert await cli_json("alerts", config=config) == []


async def test_fix_now_json_and_a_second_fix_now(relay: Relay) -> None:
    config = relay.loaded.source
    fixed = await cli_json("alerts", "fix-now", ON_PREMISES, config=config)
    assert fixed == {"connector": ON_PREMISES, "authoritative": ["onprem.contoso.test"]}
    again = await cli("alerts", "fix-now", ON_PREMISES, config=config)
    assert again.code == 1
    assert "no internal relay domain is routed through 'To on-premises'" in again.stderr


def test_fix_now_on_a_connector_without_an_internal_relay_domain_exits_1(config: Path) -> None:
    result = run_cli("alerts", "fix-now", PARTNER, config=config)
    assert result.code == 1
    assert result.stderr.strip() == (
        f"relay: no internal relay domain is routed through {PARTNER!r}; nothing to fix "
        "(see `relay domain list`)"
    )
    unknown = run_cli("alerts", "fix-now", "To nowhere", config=config)
    assert unknown.code == 1
    assert "no connector named 'To nowhere'" in unknown.stderr


def _rcpt_reply(port: int, address: str) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
        client.ehlo("client.fabrikam.test")
        client.mail(SENDER)
        code, message = client.rcpt(address)
    return f"{code} {message.decode()}"


def test_fix_now_reaches_a_running_server_within_2_seconds(
    tmp_path: Path, onprem: ClosedPort
) -> None:
    config = serving_config(tmp_path, onprem)
    with served(config) as server:
        (queue_id,) = deferred_messages(server.port, config, 1)
        assert _rcpt_reply(server.port, "nobody@onprem.contoso.test").startswith("250")

        ok(run_cli("alerts", "fix-now", ON_PREMISES, config=config))
        acted(
            config,
            lambda: _rcpt_reply(server.port, "nobody@onprem.contoso.test") == ACCESS_DENIED,
            "RCPT to an unknown on-premises address rejected with 550 5.4.1",
        )
        acted(
            config,
            lambda: (
                _status(config, queue_id) == "failed"
                and ndr_statuses(mailbox_root(config), SENDER) == ["5.1.10"]
            ),
            "queued mail for an unknown recipient failed with an NDR",
        )
        row = _show(config, queue_id)["recipients"][0]
        assert row["last_error"]["reply"] == NOT_FOUND


# ---- every table fits 100 columns ---------------------------------------------------------


TABLES = (
    ("queue", "list"),
    ("queue", "digest"),
    ("alerts",),
    ("domain", "list"),
    ("connector", "list"),
    ("clock", "show"),
    ("queue", "show", "1"),
)


async def test_tables_fit_the_terminal_and_are_never_cut(
    tmp_path: Path, onprem: ClosedPort
) -> None:
    """Issue 12: at 80 and 200 columns (a real pseudo-terminal) every line fits and nothing
    is cut; piped, nothing is wrapped or cut: the long route name and the last error with
    its LastAttemptedServerName come whole on one line."""
    long_name = "To the on-premises organization behind the long-named firewall xx"[:64]
    connectors = closed_connectors(onprem)
    connectors[0]["name"] = long_name
    connectors[0]["recipient_domains"] = [
        "onprem.contoso.test",
        "a-rather-long-subdomain-name.onprem.contoso.test",
        "*.another-long-subdomain-name.example",
    ]
    config = ops_config(
        tmp_path,
        onprem,
        connectors=connectors,
        accepted_domains=[
            *example_data()["accepted_domains"][:1],
            {
                "name": "a-rather-long-subdomain-name.onprem.contoso.test",
                "type": "internal_relay",
                "mailboxes": [],
            },
            *example_data()["accepted_domains"][1:],
        ],
    )
    local = "a-very-long-local-part-that-keeps-going-and-going-and-going-on-and-on"
    async with manual_relay(config) as relay:
        await submit(
            relay,
            f"{local}@a-rather-long-subdomain-name.onprem.contoso.test",
            mail_from=f"{local}@contoso.test",
        )
        await submit(relay, "bob@onprem.contoso.test")
        await run_once(relay)
        piped: list[CliResult] = await asyncio.gather(
            *(cli(*args, config=config) for args in TABLES)
        )
        terminals = {
            columns: await asyncio.gather(
                *(
                    asyncio.to_thread(run_in_terminal, *args, config=config, columns=columns)
                    for args in TABLES
                )
            )
            for columns in (80, 200)
        }
    error = next(
        line.strip().strip("()")
        for line in ok(piped[0]).stdout.splitlines()
        if "4.4.316" in line and "LastAttemptedServerName" in line
    )
    assert error.startswith("450 4.4.316 Connection refused [Message=connect to")
    assert error.endswith(f"[LastAttemptedIP=127.0.0.1:{onprem.port}]"), error
    for args, result in zip(TABLES, piped, strict=True):
        assert_uncut(ok(result).stdout)
        if args != ("clock", "show") and args != ("domain", "list"):
            assert long_name in result.stdout, (args, result.stdout)
    for name in ("queue list", "queue digest", "alerts"):
        assert error in piped[[" ".join(a) for a in TABLES].index(name)].stdout, name
    assert any(len(line) > 100 for line in piped[0].stdout.splitlines())  # piped: not wrapped
    for columns, results in terminals.items():
        for args, result in zip(TABLES, results, strict=True):
            text = ok(result).stdout
            # The Fix now command stays on one line, whole, to be copied (relay.views).
            command = f'    relay alerts fix-now "{long_name}"'
            assert_fits(text.replace(command, "(the command)"), columns)
            assert_uncut(text)
            flat = " ".join(text.split())
            assert "[LastAttemptedServerName=127.0.0.1]" in flat or args[0] in (
                "domain",
                "connector",
                "clock",
            ), (columns, args, text)
            if args[:2] in (("queue", "list"), ("queue", "digest"), ("alerts",)):
                assert long_name in flat, (columns, args, text)
    at_80 = terminals[80][0].stdout
    assert f"via {long_name}" in at_80  # too wide at 80: the route has a line of its own
    in_column = f"{long_name}  bob@onprem.contoso.test"
    assert in_column in terminals[200][0].stdout  # at 200, in its column
    assert in_column not in at_80
    assert f"\n{long_name}\n" in terminals[80][1].stdout  # the digest's route, likewise
    assert f"\n{long_name} " in terminals[200][1].stdout  # at 200, in its column
