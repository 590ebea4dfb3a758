"""Issue 4, section 4: the lab's simulated clock (`relay clock show|advance|reset`).

The offset lives in the queue database: the CLI shows and moves it with no server running,
`queue list` and `queue digest` say when it is set, and a running server picks it up within
seconds: `relay clock advance 48h` turns every deferred message into an NDR (Done when).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.delivery_support import ClosedPort
from tests.helpers import queued_id, run_cli, run_cli_many, send_mail_sync, wait_for
from tests.ops_support import (
    SENDER,
    assert_fits,
    assert_uncut,
    epoch,
    ndr_statuses,
    ok,
    ops_config,
    parse_json,
    served,
    serving_config,
)

pytestmark = pytest.mark.timeout(60)

DAY2 = 48 * 3600.0
NOTE = "lab clock is offset by +48h"


@pytest.fixture
def config(tmp_path: Path, onprem: ClosedPort) -> Path:
    return ops_config(tmp_path, onprem)


def test_show_advance_reset(config: Path) -> None:
    before = time.time()
    shown = parse_json(run_cli("clock", "show", "--json", config=config))
    assert set(shown) == {"now", "real_now", "offset_seconds"}
    assert shown["offset_seconds"] == 0
    assert shown["now"] == shown["real_now"]
    assert before - 1 <= epoch(shown["now"]) <= time.time() + 1
    text = ok(run_cli("clock", "show", config=config)).stdout
    assert "relay time:" in text and "not offset" in text

    moved = parse_json(run_cli("clock", "advance", "48h", "--json", config=config))
    assert moved["offset_seconds"] == DAY2
    assert epoch(moved["now"]) - epoch(moved["real_now"]) == DAY2
    shown = parse_json(run_cli("clock", "show", "--json", config=config))
    assert shown["offset_seconds"] == DAY2
    text = ok(run_cli("clock", "show", config=config)).stdout
    assert NOTE in text and "relay clock reset" in text
    assert_fits(text)

    more = parse_json(run_cli("clock", "advance", "90s", "--json", config=config))
    assert more["offset_seconds"] == DAY2 + 90  # advances add up

    reset = parse_json(run_cli("clock", "reset", "--json", config=config))
    assert reset["offset_seconds"] == 0
    text = ok(run_cli("clock", "show", config=config)).stdout
    assert "not offset" in text


@pytest.mark.parametrize("duration", ["soon", "48", "5 minutes", "1w"])
def test_a_bad_duration_exits_2_with_a_clear_message(config: Path, duration: str) -> None:
    result = run_cli("clock", "advance", duration, config=config)
    assert result.code == 2, result
    assert result.stderr.strip() == (
        f"relay: clock advance: {duration!r} is not a duration; write a number and a unit "
        "(ms, s, m, h, d), like '15m'"
    )
    assert parse_json(run_cli("clock", "show", "--json", config=config))["offset_seconds"] == 0


def test_a_backwards_duration_is_a_usage_error(config: Path) -> None:
    # argparse takes "-5m" for an option: exit 2 with the usage, never a traceback.
    result = run_cli("clock", "advance", "-5m", config=config)
    assert result.code == 2
    assert "usage: relay clock advance" in result.stderr and "Traceback" not in result.stderr


def test_queue_list_and_digest_say_when_the_clock_is_offset(config: Path) -> None:
    listing, digest = run_cli_many(("queue", "list"), ("queue", "digest"), config=config)
    assert "offset" not in ok(listing).stdout
    assert "offset" not in ok(digest).stdout

    ok(run_cli("clock", "advance", "48h", config=config))
    listing, digest = run_cli_many(("queue", "list"), ("queue", "digest"), config=config)
    for result in (listing, digest):
        assert NOTE in ok(result).stdout, result.stdout
        assert "relay clock reset" in result.stdout
        assert_uncut(result.stdout)

    ok(run_cli("clock", "reset", config=config))
    listing, digest = run_cli_many(("queue", "list"), ("queue", "digest"), config=config)
    assert "offset" not in ok(listing).stdout
    assert "offset" not in ok(digest).stdout


def test_advance_48h_turns_deferred_mail_into_ndrs_within_seconds(
    tmp_path: Path, onprem: ClosedPort
) -> None:
    config = serving_config(tmp_path, onprem)
    mailboxes = tmp_path / "queue" / "mailboxes"
    with served(config) as server:
        ids = [
            queued_id(
                send_mail_sync(
                    server.port, rcpt_tos=[f"{name}@onprem.contoso.test"], mail_from=SENDER
                )
            )
            for name in ("bob", "carol")
        ]

        def deferred() -> bool:
            rows = parse_json(
                run_cli("queue", "list", "--status", "deferred", "--json", config=config)
            )
            return {m["id"] for m in rows} == set(ids)

        wait_for(deferred, timeout=15, what="both messages deferred (4.4.316)")
        assert ndr_statuses(mailboxes, SENDER) == []

        ok(run_cli("clock", "advance", "48h", config=config))
        started = time.monotonic()

        def expired() -> bool:
            rows = parse_json(
                run_cli("queue", "list", "--status", "expired", "--json", config=config)
            )
            return {m["id"] for m in rows} == set(ids) and len(ndr_statuses(mailboxes, SENDER)) == 2

        wait_for(expired, timeout=10, what="both expired and two NDRs in alice's Maildir")
        elapsed = time.monotonic() - started
        assert ndr_statuses(mailboxes, SENDER) == ["5.4.316", "5.4.316"]
        for message_id in ids:
            shown = parse_json(run_cli("queue", "show", str(message_id), "--json", config=config))
            (row,) = shown["recipients"]
            assert row["last_error"]["reply"] == "550 5.4.316 Message expired, connection refused"
        assert elapsed < 10
