"""Issue 10: the spool's disk fills up while mail flows, then gets room again.

The queue lives on an 8 MB tmpfs mounted for the test (root only, as in CI; a loud skip
otherwise, a failure when CI=true). A ballast file fills it. While it is full, intake answers
451 4.3.0 (nothing it did not commit gets a 250), and delivery results that cannot be
written are retried with backoff while their messages stay in flight: the destination gets
none of them twice. Once the ballast is removed the results are written and everything that
was acknowledged is delivered exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.qmgr import scheduler
from relay.states import Status
from tests.delivery_support import (
    ScriptedPeer,
    connector,
    example_connectors,
    manual_relay,
    recipient,
    run_once,
    submit,
)
from tests.helpers import make_message, missing, send_mail, write_config

pytestmark = pytest.mark.timeout(60)

PARTNER = "Partner"
SIZE = "8m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of SIZE mounted at tmp_path/spool for the test, unmounted afterwards."""
    mount = tmp_path / "spool"
    mount.mkdir()
    reason = ""
    if os.geteuid() != 0:
        reason = "not root, so no tmpfs can be mounted for the disk-full test"
    else:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            reason = f"mount -t tmpfs failed ({done.stderr.strip() or done.returncode})"
    if reason:
        missing(
            f"{reason}; the disk-full test did NOT run, and CI would FAIL here (run it as root)"
        )
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a ballast file until the filesystem has no byte left; returns its path."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        size = 1 << 20
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                size //= 2
    finally:
        os.close(fd)
    return ballast


def sink_subjects(peer: ScriptedPeer) -> Counter[str]:
    found: Counter[str] = Counter()
    for delivered in peer.received:
        for line in delivered.data.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                found[line[9:].decode()] += 1
    return found


async def test_a_full_disk_loses_nothing_acknowledged_and_sends_nothing_twice(
    tmp_path: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler, "PARCELS_PER_CONNECTION", 4)  # five connections for 20
    async with ScriptedPeer() as peer:
        config = write_config(
            tmp_path,
            queue={"path": str(small_disk / "relay.db")},
            connectors=[*example_connectors(), connector(PARTNER, "partner.test", peer.port)],
        )
        async with manual_relay(config) as relay:
            acknowledged = {
                await submit(relay, to=f"u{n}@partner.test", subject=f"m{n}"): f"m{n}"
                for n in range(20)
            }
            ballast = fill(small_disk)

            # Deliveries go out, but none of their results can be written...
            assert relay.worker is not None
            delivering = asyncio.create_task(relay.worker.run_once())
            # ... and intake cannot commit: 451 4.3.0, never a 250 for what is not on disk.
            for n in range(5):
                subject = f"while full {n}"
                reply = await send_mail(
                    relay.port,
                    rcpt_tos=["late@partner.test"],
                    content=make_message(subject=subject, to="late@partner.test"),
                )
                if reply.startswith("250 "):
                    acknowledged[int(reply.split("InternalId=")[1].split("]")[0])] = subject
                else:
                    assert reply.startswith("451 4.3.0 "), reply
            assert set(acknowledged.values()) == {f"m{n}" for n in range(20)}, "a 250 while full"

            await asyncio.sleep(2.5)  # real time: the results' backoff runs on it
            sent = sink_subjects(peer)
            assert sent, "nothing was delivered while the disk was full"
            assert max(sent.values()) == 1, f"sent again while its result was unwritten: {sent}"
            assert len(sent) <= 5, f"went on sending with results unwritten: {sent}"
            assert not delivering.done()

            ballast.unlink()
            started = time.monotonic()
            await asyncio.wait_for(delivering, 20)
            print(f"\nresults written {time.monotonic() - started:.1f}s after the disk had room")
            for queue_id in acknowledged:
                assert (await recipient(relay, queue_id)).status is Status.DELIVERED
            assert sink_subjects(peer) == Counter(acknowledged.values())

            # Intake takes mail again.
            after = await submit(relay, to="after@partner.test", subject="after")
            await run_once(relay)
            assert (await recipient(relay, after)).status is Status.DELIVERED
        with contextlib.suppress(FileNotFoundError):
            ballast.unlink()
    assert sink_subjects(peer) == Counter([*acknowledged.values(), "after"])
