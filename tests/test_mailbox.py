"""Issue 12, section 4: reading queued messages (`queue show --headers/--raw`) and the local
Maildirs (`relay mailbox list/show`), over a real NDR the relay generated and delivered."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from relay.server import Relay
from tests.delivery_support import SENDER, run_once, submit
from tests.helpers import make_message, run_cli, run_main

pytestmark = pytest.mark.timeout(30)

REJECTED = "user@rcpt-550.lab.test"  # the lab target that answers RCPT with 550
SUBJECT = "Quarterly report"


def _config(relay: Relay) -> Path:
    return Path(relay.loaded.source)


async def _bounced(relay: Relay) -> int:
    """Mail to the 550 target: it fails at once and alice's NDR is delivered to her Maildir."""
    content = make_message(subject=SUBJECT, sender=SENDER, to=REJECTED)
    queue_id = await submit(relay, to=REJECTED, content=content)
    await run_once(relay)  # the attempt: 550, failed, NDR queued
    await run_once(relay)  # the NDR into alice's Maildir
    return queue_id


def _bytes(file: str) -> bytes:
    return Path(file).read_bytes()


async def _main(*args: str, config: Path) -> tuple[int, str, str]:
    return await asyncio.to_thread(run_main, *args, config=config)


async def test_mailbox_list_and_show_read_a_real_ndr(relay: Relay) -> None:
    await _bounced(relay)
    config = _config(relay)

    code, out, err = await _main("mailbox", "list", SENDER, "--json", config=config)
    assert code == 0, err
    (entry,) = json.loads(out)
    assert set(entry) == {"address", "n", "file", "date", "from", "subject", "size"}
    assert (entry["address"], entry["n"]) == (SENDER, 1)
    assert entry["subject"] == f"Undeliverable: {SUBJECT}"
    assert entry["from"] == "postmaster@contoso.test"
    assert entry["date"].endswith("Z") and entry["size"] == len(_bytes(entry["file"]))

    code, out, err = await _main("mailbox", "show", SENDER, "1", "--json", config=config)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["to"] == SENDER and shown["subject"] == f"Undeliverable: {SUBJECT}"
    assert shown["text"].startswith("Delivery has failed to these recipients"), shown["text"]
    assert "550 5.1.1 User unknown" in shown["text"] and not shown["text"].endswith("\n")
    (status,) = shown["delivery_status"]
    assert status["final_recipient"] == REJECTED
    assert status["action"] == "failed"
    assert status["status"].startswith("5.")
    assert status["diagnostic_code"].startswith("550 ")
    assert status["remote_mta"] == "rcpt-550.lab.test"

    code, out, err = await _main("mailbox", "show", SENDER, "1", config=config)
    assert code == 0, err
    assert "Delivery status:" in out
    assert f"Final-Recipient:  {REJECTED}" in out
    assert "Action:           failed" in out
    assert "rfc822;" not in out.split("Delivery status:")[1]

    code, out, err = await _main("mailbox", "list", config=config)
    assert code == 0, err
    assert f"{SENDER}:" in out and f"Undeliverable: {SUBJECT}" in out


async def test_mailbox_show_raw_is_the_file_and_a_missing_number_exits_1(relay: Relay) -> None:
    await _bounced(relay)
    config = _config(relay)
    listed = json.loads((await _main("mailbox", "list", "--json", config=config))[1])
    (entry,) = [e for e in listed if e["address"] == SENDER]
    raw = await asyncio.to_thread(run_cli, "mailbox", "show", SENDER, "1", "--raw", config=config)
    assert raw.code == 0, raw.stderr
    assert raw.stdout.encode() == _bytes(entry["file"])

    code, _, err = await _main("mailbox", "show", SENDER, "2", config=config)
    assert code == 1
    assert "no message 2 in the mailbox" in err and str(config) in err and "holds 1" in err


async def test_an_empty_mailbox_list_says_where_it_looked(relay: Relay) -> None:
    code, out, err = await _main("mailbox", "list", "nobody@contoso.test", config=_config(relay))
    assert code == 0, err
    assert out.startswith("No mail in the mailbox nobody@contoso.test under ")
    assert str(_config(relay)) in out
    root = relay.loaded.path(relay.config.mailboxes.path)
    assert str(root) in out


async def test_queue_show_headers_and_raw_print_the_stored_message(relay: Relay) -> None:
    content = make_message(subject=SUBJECT, sender=SENDER, to="user@refused.lab.test")
    queue_id = await submit(relay, to="user@refused.lab.test", content=content)
    config = _config(relay)
    stored = await relay.store.content(queue_id)

    raw = await asyncio.to_thread(run_cli, "queue", "show", str(queue_id), "--raw", config=config)
    assert raw.code == 0, raw.stderr
    assert raw.stdout.encode() == stored.replace(b"\r\n", b"\n")  # text mode reads CRLF as LF
    assert raw.stdout.startswith("Received: from ")

    headers = await asyncio.to_thread(
        run_cli, "queue", "show", str(queue_id), "--headers", config=config
    )
    assert headers.code == 0, headers.stderr
    head = stored.split(b"\r\n\r\n", 1)[0].replace(b"\r\n", b"\n").decode()
    assert headers.stdout == head + "\n"
    assert f"Subject: {SUBJECT}" in headers.stdout and "Received: from " in headers.stdout
    assert content.split(b"\r\n\r\n", 1)[1].decode().strip() not in headers.stdout

    missing = await asyncio.to_thread(run_cli, "queue", "show", "999", "--raw", config=config)
    assert missing.code == 1 and str(config) in missing.stderr
