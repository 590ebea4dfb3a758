"""Issue 4, section 2: mail flow alerts and the "Messages have been delayed" notification.

First the pure functions of relay.alerts on hand-made digest rows, then the episode on an
in-process relay: a connector at a refused port, the ManualClock moved past `after`, one
notification into admin@contoso.test's Maildir, none again until the queue drains.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import email.utils
from pathlib import Path
from typing import Any

import pytest

from relay import codes
from relay.alerts import Alert, alerts, build_notification, due_notifications
from relay.clock import iso
from relay.config import AlertsConfig
from relay.policy import Policy
from relay.spool.rows import DigestRow, LastError
from relay.spool.settings import ALERT_NOTIFIED
from relay.views import short_time
from tests.delivery_support import (
    ClosedPort,
    ScriptedPeer,
    advance,
    closed_port,
    maildir_messages,
    manual_relay,
    run_once,
)
from tests.helpers import example_data, load, queued_id, send_mail
from tests.ops_support import (
    ADMIN,
    ON_PREMISES,
    SENDER,
    assert_uncut,
    cli,
    cli_json,
    closed_connectors,
    main_json,
    ok,
    ops_config,
)

pytestmark = pytest.mark.timeout(60)

PARTNER = "Partner fabrikam"
T0 = 1_800_000_000.0
REFUSED = (
    "450 4.4.316 Connection refused [Message=connect to 127.0.0.1:2701 failed: connection "
    "refused] [LastAttemptedServerName=refused.lab.test] [LastAttemptedIP=127.0.0.1:2701]"
)
TIMED_OUT = (
    "450 4.4.315 Connection timed out [Message=connect to 127.0.0.1:2702 timed out] "
    "[LastAttemptedServerName=timeout.lab.test] [LastAttemptedIP=127.0.0.1:2702]"
)


# ---- alerts() ------------------------------------------------------------------------------


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    with closed_port() as onprem, closed_port() as partner:
        path = ops_config(tmp_path, onprem, connectors=closed_connectors(onprem, partner))
    return Policy.build(load(path).config)


def error(reply: str, *, at: float, server: str = "refused.lab.test") -> LastError:
    code = reply.split()[1]
    title = codes.CODES[code].title if code in codes.CODES else reply
    return LastError(code, reply, title, server, "127.0.0.1:2701", at)


def row(
    connector: str,
    last: LastError | None,
    *,
    messages: int = 1,
    started: float = T0,
    deferred: int | None = None,
    held: int = 0,
) -> DigestRow:
    recipients = messages
    return DigestRow(
        connector=connector,
        code=last.code if last else None,
        messages=messages,
        recipients=recipients,
        held=held,
        deferred=recipients - held if deferred is None else deferred,
        queue_started_at=started,
        next_retry_at=None if held == recipients else started + 60,
        oldest_expires_at=started + 48 * 3600,
        last_error=last,
    )


def test_one_alert_per_connector_with_the_latest_code(policy: Policy) -> None:
    digest = [
        row(ON_PREMISES, error(TIMED_OUT, at=T0 + 10), messages=2, started=T0),
        row(ON_PREMISES, error(REFUSED, at=T0 + 20), messages=3, started=T0 + 5),
        row(ON_PREMISES, None, messages=4, started=T0 - 50, deferred=0),  # not tried yet
    ]
    (alert,) = alerts(digest, policy)
    assert (alert.connector, alert.code, alert.title) == (
        ON_PREMISES,
        "4.4.316",
        "Connection refused",
    )
    assert alert.queued == 5  # the deferred messages, not the ones waiting for a first try
    assert alert.queue_started_at == T0
    assert alert.oldest_expires_at == T0 + 48 * 3600
    assert alert.last_error.reply == REFUSED
    assert alert.how_to_fix == codes.CONNECTION_REFUSED.how_to_fix
    assert alert.fix_now is True
    assert alert.notified_at is None

    digest[0] = row(ON_PREMISES, error(TIMED_OUT, at=T0 + 30), messages=2)
    (alert,) = alerts(digest, policy)
    assert (alert.code, alert.fix_now) == ("4.4.315", False)


def test_fix_now_only_for_4_4_316_on_an_on_premises_connector(policy: Policy) -> None:
    digest = [
        row(ON_PREMISES, error(REFUSED, at=T0)),
        row(PARTNER, error(REFUSED, at=T0), started=T0 + 1),
    ]
    by_name = {a.connector: a for a in alerts(digest, policy)}
    assert by_name[ON_PREMISES].fix_now is True
    assert by_name[PARTNER].fix_now is False
    assert [a.connector for a in alerts(digest, policy)] == [ON_PREMISES, PARTNER]  # oldest first


@pytest.mark.parametrize(
    "digest_row",
    [
        row(ON_PREMISES, error("451 4.7.1 Greylisted, try again later", at=T0)),  # the remote's own
        row(ON_PREMISES, None),  # queued, never tried
        row("mx", error(REFUSED, at=T0)),  # not a connector
        row("mailbox", error("451 4.3.0 Could not write to the mailbox", at=T0)),
        row(ON_PREMISES, error(REFUSED, at=T0), held=1),  # all held: nothing deferred
    ],
    ids=["other-code", "not-tried", "mx", "mailbox", "held"],
)
def test_only_deferred_mail_flow_codes_on_connectors_alert(
    policy: Policy, digest_row: DigestRow
) -> None:
    assert alerts([digest_row], policy) == []


def test_notified_at_comes_from_the_settings(policy: Policy) -> None:
    digest = [row(ON_PREMISES, error(REFUSED, at=T0)), row(PARTNER, error(REFUSED, at=T0))]
    current = alerts(digest, policy, {ALERT_NOTIFIED(ON_PREMISES).text: repr(T0 + 3600.5)})
    by_name = {a.connector: a for a in current}
    assert by_name[ON_PREMISES].notified_at == T0 + 3600.5
    assert by_name[PARTNER].notified_at is None
    assert by_name[ON_PREMISES].to_json()["notified_at"] == iso(T0 + 3600.5)


# ---- due_notifications() -------------------------------------------------------------------


def alert(*, queued: int = 1, started: float = T0, notified_at: float | None = None) -> Alert:
    return Alert(
        connector=ON_PREMISES,
        code="4.4.316",
        title="Connection refused",
        queued=queued,
        queue_started_at=started,
        oldest_expires_at=started + 48 * 3600,
        last_error=error(REFUSED, at=started),
        how_to_fix=codes.CONNECTION_REFUSED.how_to_fix,
        fix_now=True,
        notified_at=notified_at,
    )


@pytest.mark.parametrize(
    ("queued", "waited", "notified_at", "due"),
    [
        (3, 601, None, True),
        (2, 601, None, False),  # below the threshold
        (3, 600, None, False),  # waited exactly `after`, not longer
        (50, 7200, None, True),
        (50, 7200, T0 + 700, False),  # notified already in this episode
    ],
)
def test_due_notifications_threshold_after_and_once_per_episode(
    queued: int, waited: float, notified_at: float | None, due: bool
) -> None:
    settings = AlertsConfig(notify=[ADMIN], threshold=3, after="10m")
    current = [alert(queued=queued, notified_at=notified_at)]
    assert due_notifications(current, settings, T0 + waited) == (current if due else [])


# ---- build_notification() ------------------------------------------------------------------


def test_the_notification_is_a_readable_email_with_the_alert_fields() -> None:
    now = T0 + 3700
    content = build_notification(
        alert(queued=7),
        to=[ADMIN, "ops@contoso.test"],
        postmaster="postmaster@contoso.test",
        hostname="relay.contoso.test",
        now=now,
    )
    assert b"\r\n" in content and b"\n" not in content.replace(b"\r\n", b"")
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert message["From"] == "postmaster@contoso.test"
    assert [a.addr_spec for a in message["To"].addresses] == [ADMIN, "ops@contoso.test"]
    # Python folds this Subject right after the colon and reads it back with a leading space.
    assert message["Subject"].strip() == (
        "Messages have been delayed: To on-premises (4.4.316 Connection refused)"
    )
    assert message["Auto-Submitted"] == "auto-generated"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == int(now)
    assert message["Message-ID"].endswith("@relay.contoso.test>")
    body = message.get_content()
    for field in (
        ON_PREMISES,
        "7 message(s)",
        "4.4.316 Connection refused",
        REFUSED,
        "refused.lab.test",
        "127.0.0.1:2701",
        iso(T0),
        iso(T0 + 48 * 3600),
        codes.CONNECTION_REFUSED.how_to_fix.split(".")[0],
        'relay alerts fix-now "To on-premises"',
    ):
        assert field in body, field


def test_no_fix_now_hint_without_fix_now() -> None:
    content = build_notification(
        dataclasses.replace(alert(), fix_now=False),
        to=[ADMIN],
        postmaster="postmaster@contoso.test",
        hostname="relay",
        now=T0,
    )
    body = email.message_from_bytes(content, policy=email.policy.default).get_content()
    assert "fix-now" not in body


# ---- an episode on an in-process relay ------------------------------------------------------


def admin_mail(relay: Any) -> list[email.message.EmailMessage]:
    return maildir_messages(relay.loaded.path(relay.config.mailboxes.path), ADMIN)


async def test_one_notification_per_episode(tmp_path: Path, onprem: ClosedPort) -> None:
    config = ops_config(tmp_path, onprem, alerts={"notify": [ADMIN], "threshold": 1, "after": "5s"})
    async with manual_relay(config) as relay:
        first = queued_id(
            await send_mail(relay.port, rcpt_tos=["bob@onprem.contoso.test"], mail_from=SENDER)
        )
        await run_once(relay)
        assert await relay.check_alerts() == 0  # not waited longer than `after` yet
        advance(relay, 6)
        assert await relay.check_alerts() == 1
        notified_at = relay.clock.now()
        await run_once(relay)
        (notice,) = admin_mail(relay)
        assert notice["Subject"].strip() == (
            "Messages have been delayed: To on-premises (4.4.316 Connection refused)"
        )
        assert "Connection refused [Message=" in notice.get_content()

        (shown,) = await cli_json("alerts", config=config)
        assert (shown["connector"], shown["code"], shown["fix_now"]) == (
            ON_PREMISES,
            "4.4.316",
            True,
        )
        assert shown["notified_at"] == iso(notified_at)
        assert shown["queued"] == 1
        assert set(shown) == {
            "connector",
            "code",
            "title",
            "queued",
            "queue_started_at",
            "oldest_expires_at",
            "server",
            "ip",
            "last_error",
            "how_to_fix",
            "fix_now",
            "notified_at",
        }
        table = ok(await cli("alerts", config=config)).stdout
        assert_uncut(table)
        assert "Fix now available" in table and 'relay alerts fix-now "To on-premises"' in table
        assert f"Notified:           {short_time(notified_at)} (" in table

        advance(relay, 30)
        await run_once(relay)
        assert await relay.check_alerts() == 0  # once per episode
        assert len(admin_mail(relay)) == 1

        # On-premises comes back: the queue drains and the episode is over.
        onprem.release()
        async with ScriptedPeer(port=onprem.port) as peer:
            advance(relay, 60)
            await run_once(relay)
            assert [d.rcpt_tos for d in peer.received] == [("bob@onprem.contoso.test",)]
        assert (await main_json("queue", "show", str(first), config=config))["recipients"][0][
            "status"
        ] == "delivered"
        assert await relay.check_alerts() == 0
        assert await main_json("alerts", config=config) == []

        # It goes away again: a new episode, a new notification.
        await send_mail(relay.port, rcpt_tos=["carol@onprem.contoso.test"], mail_from=SENDER)
        await run_once(relay)
        advance(relay, 6)
        assert await relay.check_alerts() == 1
        await run_once(relay)
        assert len(admin_mail(relay)) == 2
        assert (await main_json("alerts", config=config))[0]["notified_at"] == iso(
            relay.clock.now()
        )


def test_example_config_alerts_are_exchange_defaults() -> None:
    settings = example_data()["alerts"]
    assert (settings["threshold"], settings["after"]) == (200, "1h")
