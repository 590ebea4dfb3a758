"""The issue's "Done when", as a user would check it: `relay serve` in a subprocess, mail
sent with swaks, the queue read with `relay queue show ID --json`, the clock moved by the
lab's stored offset, and the NDR read from the sender's Maildir.

The lab peers run in this test's event loop, so every blocking call (the subprocesses, the
CLI, SQLite) goes through `asyncio.to_thread` while they keep answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from relay import codes
from relay.lab.faults import EXPECTED, Fault, FaultLab
from tests.delivery_support import SENDER, lab_config, maildir_messages
from tests.helpers import (
    RelayProcess,
    free_port,
    poll,
    require_program,
    run_cli,
    start_relay_process,
)

pytestmark = [pytest.mark.swaks, pytest.mark.timeout(60)]

T = TypeVar("T")
TWO_DAYS = 48 * 3600
INTERNAL_ID = re.compile(r"\[InternalId=(\d+)\]")


@pytest.fixture
async def served(tmp_path: Path, lab: FaultLab) -> AsyncIterator[RelayProcess]:
    require_program("swaks")
    config = lab_config(tmp_path, lab, smtp={"listen": f"127.0.0.1:{free_port()}"})
    process = await asyncio.to_thread(start_relay_process, config)
    try:
        yield process
    finally:
        await asyncio.to_thread(_stop, process)


def _stop(process: RelayProcess) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):  # stop() has killed it then
        process.stop()


async def swaks(relay: RelayProcess, *, to: str, sender: str = SENDER) -> int:
    """Send with swaks as the issue says; returns the relay's queue id."""
    done = await asyncio.to_thread(
        subprocess.run,
        [
            require_program("swaks"),
            "--to", to,
            "--from", sender,
            "--server", f"{relay.host}:{relay.port}",
            "--header", f"Subject: to {to}",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    match = INTERNAL_ID.search(done.stdout)
    assert match, done.stdout
    return int(match.group(1))


async def show(relay: RelayProcess, queue_id: int) -> dict[str, Any]:
    result = await asyncio.to_thread(
        run_cli, "queue", "show", str(queue_id), "--json", config=relay.config
    )
    assert result.code == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


async def queue_list(relay: RelayProcess) -> dict[int, dict[str, Any]]:
    """`relay queue list --json`, by queue id."""
    result = await asyncio.to_thread(
        run_cli, "queue", "list", "--all", "--json", config=relay.config
    )
    assert result.code == 0, result.stderr
    return {int(m["id"]): m for m in json.loads(result.stdout)}


async def advance_clock(relay: RelayProcess, seconds: int) -> None:
    """`relay clock advance`: the offset reaches the running server through the queue."""
    result = await asyncio.to_thread(
        run_cli, "clock", "advance", f"{seconds}s", config=relay.config
    )
    assert result.code == 0, result.stderr


def _first(data: dict[str, Any]) -> dict[str, Any]:
    (recipient,) = data["recipients"]
    assert isinstance(recipient, dict)
    return recipient


async def test_done_when_refused_shows_4_4_316_then_expires_with_an_ndr(
    served: RelayProcess, lab: FaultLab
) -> None:
    queue_id = await swaks(served, to="user@refused.lab.test")

    async def refused() -> dict[str, Any] | None:
        recipient = _first(await show(served, queue_id))
        error = recipient["last_error"]
        return recipient if error and error["code"] == "4.4.316" else None

    recipient = await poll(refused, what="last_error.code 4.4.316", step=0.2)
    assert recipient["status"] == "deferred"
    assert recipient["last_error"]["reply"].startswith("450 4.4.316 Connection refused [Message=")
    assert recipient["history"][-1]["reply"] == recipient["last_error"]["reply"]

    await advance_clock(served, TWO_DAYS)

    mailboxes = served.config.parent / "queue" / "mailboxes"

    async def ndr() -> list[str] | None:
        return [m.as_string() for m in maildir_messages(mailboxes, SENDER)] or None

    (text,) = await poll(ndr, what="the NDR in alice's Maildir", step=0.2)
    assert "Status: 5.4.316" in text
    assert "Final-Recipient: rfc822;user@refused.lab.test" in text
    recipient = _first(await show(served, queue_id))
    assert recipient["status"] == "expired"
    assert recipient["last_error"]["reply"] == "550 5.4.316 Message expired, connection refused"


async def test_a_healthy_connector_delivers(served: RelayProcess, lab: FaultLab) -> None:
    queue_id = await swaks(served, to="user@good.lab.test")

    async def delivered() -> dict[str, Any] | None:
        recipient = _first(await show(served, queue_id))
        return recipient if recipient["status"] == "delivered" else None

    recipient = await poll(delivered, what="delivered", step=0.2)
    assert recipient["connector"] == "Lab good"
    assert recipient["last_error"] is None
    (got,) = lab.servers[Fault.GOOD].received
    assert got.rcpt_tos == ("user@good.lab.test",)
    assert got.tls
    assert got.data.startswith(b"Received: from ")


async def test_every_fault_yields_its_code_through_relay_serve(
    served: RelayProcess, lab: FaultLab
) -> None:
    modes = list(EXPECTED)
    queued = await asyncio.gather(*(swaks(served, to=f"user@{mode}.lab.test") for mode in modes))
    ids = dict(zip(modes, queued, strict=True))

    async def settled() -> dict[str, dict[str, Any]] | None:
        listing = await queue_list(served)
        found = {mode: _first(listing[queue_id]) for mode, queue_id in ids.items()}
        if all(r["status"] == "delivered" or r["last_error"] for r in found.values()):
            return found
        return None

    found = await poll(settled, what="every mode attempted", timeout=15, step=0.2)
    for mode, expected in EXPECTED.items():
        recipient = found[mode]
        if not expected:
            assert recipient["status"] == "delivered", (mode, recipient)
        else:
            assert recipient["last_error"]["code"] == expected, (mode, recipient["last_error"])
    assert found["rcpt-550"]["status"] == "failed"

    # Two days later every deferred one has expired with the line for its last code.
    await advance_clock(served, TWO_DAYS)
    waiting = {m for m, r in found.items() if r["status"] == "deferred"}

    async def all_expired() -> dict[str, dict[str, Any]] | None:
        listing = await queue_list(served)
        now = {mode: _first(listing[ids[mode]]) for mode in waiting}
        return now if all(r["status"] == "expired" for r in now.values()) else None

    for mode, recipient in (
        await poll(all_expired, what="every deferred one expired", step=0.2)
    ).items():
        assert recipient["last_error"]["reply"] == codes.expired_reply(EXPECTED[mode]), mode
    mailboxes = served.config.parent / "queue" / "mailboxes"
    expected_ndrs = len(waiting) + 1  # and one for rcpt-550, sent at once

    async def every_ndr() -> bool:
        return len(maildir_messages(mailboxes, SENDER)) == expected_ndrs

    await poll(every_ndr, what=f"{expected_ndrs} NDRs in alice's Maildir", step=0.2)
