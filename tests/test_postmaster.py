"""Postmaster (issue 10, item 4; RFC 5321 section 4.5.1), over real sockets.

`RCPT TO:<postmaster>` (no domain, any case) and `postmaster@<every accepted domain>` are
accepted from any client and delivered into one local Maildir: `[mailboxes] postmaster`,
by default postmaster@<default domain>, the address the relay's own NDRs come from. A
bounce to that address lands there instead of being dropped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.lab.faults import FaultLab
from relay.server import Relay
from relay.states import Status
from tests.delivery_support import (
    lab_config,
    maildir_messages,
    manual_relay,
    message,
    ndrs,
    run_once,
    submit,
)
from tests.helpers import StartRelay, make_message, queued_id
from tests.test_intake_hostile import RCPT_OK, raw_session

pytestmark = pytest.mark.timeout(30)

DEFAULT_POSTMASTER = "postmaster@contoso.test"  # the example config's default domain
NOT_A_RELAY = {"relay_networks": ["10.0.0.0/8"]}  # 127.0.0.1 may not relay


async def _send(relay: Relay, rcpts: list[str], *, mail_from: str = "sender@fabrikam.test") -> int:
    """One transaction over a raw session (aiosmtplib insists on an @ in RCPT TO)."""
    async with raw_session(relay.port) as session:
        assert (await session.send(f"MAIL FROM:<{mail_from}>".encode())).startswith("250 ")
        for rcpt in rcpts:
            assert await session.send(f"RCPT TO:<{rcpt}>".encode()) == RCPT_OK, rcpt
        assert (await session.send(b"DATA")).startswith("354 ")
        session.writer.write(make_message(subject="to the postmaster", to=rcpts[0]) + b".\r\n")
        return queued_id(await session.reply())


@pytest.mark.parametrize(
    "rcpt",
    [
        "postmaster",
        "Postmaster",
        "POSTMASTER",
        "postmaster@contoso.test",
        "PostMaster@Contoso.TEST",
    ],
)
async def test_postmaster_is_accepted_from_any_client_and_delivered(
    start_relay: StartRelay, rcpt: str
) -> None:
    relay = await start_relay(smtp=NOT_A_RELAY)
    queue_id = await _send(relay, [rcpt])
    await run_once(relay)
    (row,) = (await message(relay, queue_id)).recipients
    assert row.address == rcpt
    assert row.connector == "mailbox"
    assert row.status is Status.DELIVERED
    (delivered,) = maildir_messages(relay, DEFAULT_POSTMASTER)
    assert delivered["Subject"] == "to the postmaster"
    assert delivered["Delivered-To"] == DEFAULT_POSTMASTER


async def test_postmaster_of_an_internal_relay_domain_stays_local(start_relay: StartRelay) -> None:
    """onprem.contoso.test relays unknown addresses on-premises; its postmaster is ours."""
    relay = await start_relay(smtp=NOT_A_RELAY)
    queue_id = await _send(relay, ["postmaster@onprem.contoso.test", "postmaster"])
    await run_once(relay)
    rows = (await message(relay, queue_id)).recipients
    assert [(r.connector, r.status) for r in rows] == [("mailbox", Status.DELIVERED)] * 2
    assert len(maildir_messages(relay, DEFAULT_POSTMASTER)) == 2


async def test_postmaster_mail_goes_to_the_configured_mailbox(start_relay: StartRelay) -> None:
    relay = await start_relay(mailboxes={"postmaster": "admin@contoso.test"})
    await _send(relay, ["postmaster", "postmaster@onprem.contoso.test"])
    await run_once(relay)
    assert len(maildir_messages(relay, "admin@contoso.test")) == 2
    assert maildir_messages(relay, DEFAULT_POSTMASTER) == []


async def test_other_unknown_addresses_are_still_refused(start_relay: StartRelay) -> None:
    relay = await start_relay(smtp=NOT_A_RELAY)
    async with raw_session(relay.port) as session:
        assert (await session.send(b"MAIL FROM:<sender@fabrikam.test>")).startswith("250 ")
        assert (await session.send(b"RCPT TO:<postmaster@fabrikam.test>")).startswith("550 5.7.64")
        assert (await session.send(b"RCPT TO:<postmasters@contoso.test>")).startswith("550 5.4.1")
        assert (await session.send(b"RCPT TO:<webmaster>")).startswith("501 5.1.3")
        assert await session.send(b"RCPT TO:<postmaster>") == RCPT_OK


async def test_an_ndr_to_the_relays_own_postmaster_lands_in_its_maildir(
    tmp_path: Path, lab: FaultLab
) -> None:
    """The relay's NDRs come from postmaster@<default domain>; mail it sent from there (an
    alert, a test) that fails comes back as an NDR to that address. It used to route as an
    unknown address of the authoritative domain and fail as RecipientNotFound, and the NDR
    of that NDR (to the null sender) was dropped: the bounce vanished."""
    async with manual_relay(lab_config(tmp_path / "pm", lab)) as relay:
        queue_id = await submit(relay, to="user@rcpt-550.lab.test", mail_from=DEFAULT_POSTMASTER)
        await run_once(relay)
        await run_once(relay)
        (failed,) = (await message(relay, queue_id)).recipients
        assert failed.status is Status.FAILED
        (bounce,) = await ndrs(relay)
        (to_postmaster,) = bounce.recipients
        assert to_postmaster.address == DEFAULT_POSTMASTER
        assert to_postmaster.connector == "mailbox"
        assert to_postmaster.status is Status.DELIVERED
        (ndr,) = maildir_messages(relay, DEFAULT_POSTMASTER)
        assert ndr["From"] == DEFAULT_POSTMASTER
        assert ndr["Subject"].startswith("Undeliverable: ")
        assert ndr["Return-Path"] == "<>"
