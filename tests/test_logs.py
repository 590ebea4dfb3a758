"""The log lines a Postfix admin can grep (issue 12, section 3), over a real relay and the
lab's real fault targets: one key=value line per step with the id and the recipient, the
same fields as JSON (`[log] format = "json"`), and `relay serve -v`'s SMTP sessions in both
directions without aiosqlite's SQL.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import admin
from relay.config import LogFormat
from relay.errors import ConfigError
from relay.lab.faults import Fault, FaultLab, lab_name
from relay.logs import TEXT_FORMAT, JsonFormatter, Line, log_in_background
from relay.server import Relay
from tests.delivery_support import (
    ON_PREMISES,
    SENDER,
    advance,
    lab_config,
    manual_relay,
    run_once,
    submit,
)
from tests.helpers import (
    HOST,
    cli_env,
    free_port,
    load,
    poll,
    relay_command,
    send_mail,
    smtp_greets,
    write_config,
)

pytestmark = pytest.mark.timeout(60)

EXPIRATION = 48 * 3600.0  # the example config's message_expiration


class Lines(logging.Handler):
    """The relay's step lines (records whose message is a `Line`), as the text format and
    the JSON format write them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._text = logging.Formatter(TEXT_FORMAT)
        self._json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, Line):
            self.records.append(record)

    def text(self, status: str) -> list[str]:
        return [
            self._text.format(r).split(": ", 1)[1]
            for r in self.records
            if f" status={status}" in r.getMessage()
        ]

    def json(self, status: str) -> list[dict[str, object]]:
        entries = [json.loads(self._json.format(r)) for r in self.records]
        return [e for e in entries if e.get("status") == status]


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("relay")
    saved = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def _port(lab: FaultLab, fault: Fault) -> int:
    return lab.servers[fault].port


# ---- each step, text and JSON ---------------------------------------------------------------


async def test_queued_names_the_client_helo_size_and_message_id(relay: Relay, lines: Lines) -> None:
    queue_id = await submit(relay, to="user@good.lab.test")
    (line,) = lines.text("queued")
    assert re.fullmatch(
        rf"id={queue_id} from=<{SENDER}> to=<user@good.lab.test> nrcpt=1 size=\d+ "
        r"client=127\.0\.0\.1 helo=\S+ message_id=<\S+> status=queued",
        line,
    ), line
    (entry,) = lines.json("queued")
    assert entry["id"] == queue_id and entry["from"] == SENDER
    assert entry["to"] == ["user@good.lab.test"] and entry["client"] == "127.0.0.1"
    assert {"time", "level", "logger", "message"} <= set(entry)
    assert entry["logger"] == "relay.intake" and entry["level"] == "INFO"


async def test_delivered_carries_the_destinations_reply_server_ip_and_tls(
    relay: Relay, lab: FaultLab, lines: Lines
) -> None:
    queue_id = await submit(relay, to="user@good.lab.test")
    await run_once(relay)
    (line,) = lines.text("delivered")
    port = _port(lab, Fault.GOOD)
    server = re.escape(f"{lab_name(Fault.GOOD)}[127.0.0.1]:{port}")
    assert re.fullmatch(
        rf'id={queue_id} to=<user@good\.lab\.test> connector="Lab good" relay={server} '
        r"tls=TLSv1\.[23] delay=\d+\.\d attempts=1 status=delivered "
        r"\(250 2\.6\.0 Queued mail for delivery\)",
        line,
    ), line
    (entry,) = lines.json("delivered")
    assert entry["relay"] == f"{lab_name(Fault.GOOD)}[127.0.0.1]:{port}"
    assert entry["reply"] == "250 2.6.0 Queued mail for delivery"
    assert entry["attempts"] == 1 and isinstance(entry["delay"], float)
    assert str(entry["tls"]).startswith("TLSv1.")


async def test_each_deferral_is_a_line_with_its_code_and_next_attempt(
    relay: Relay, lab: FaultLab, lines: Lines
) -> None:
    queue_id = await submit(relay, to="user@refused.lab.test")
    await run_once(relay)
    advance(relay, 3600)
    await run_once(relay)
    first, second = lines.text("deferred")
    port = _port(lab, Fault.REFUSED)
    relay_field = re.escape(f"relay={lab_name(Fault.REFUSED)}[127.0.0.1]:{port}")
    for attempts, line in ((1, first), (2, second)):
        assert re.fullmatch(
            rf'id={queue_id} to=<user@refused\.lab\.test> connector="Lab refused" {relay_field} '
            rf"delay=\d+\.\d attempts={attempts} code=4\.4\.316 status=deferred "
            r"next_attempt=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(450 4\.4\.316 Connection refused .*\)",
            line,
        ), line
    later = lines.json("deferred")[1]
    assert later["code"] == "4.4.316" and later["attempts"] == 2
    assert str(later["reply"]).startswith("450 4.4.316 Connection refused [Message=")
    assert float(str(later["delay"])) >= 3600


async def test_a_permanent_reply_is_a_failed_line_and_the_ndr_a_line_of_its_own(
    relay: Relay, lines: Lines
) -> None:
    queue_id = await submit(relay, to="user@rcpt-550.lab.test")
    await run_once(relay)
    (line,) = lines.text("failed")
    assert re.fullmatch(
        rf"id={queue_id} to=<user@rcpt-550\.lab\.test> .* attempts=1 code=5\.\d+\.\d+ "
        r"status=failed \(550 .*\)",
        line,
    ), line
    assert "next_attempt=" not in line
    (ndr,) = lines.text("ndr-queued")
    found = re.fullmatch(
        rf"id={queue_id} ndr=(\d+) to=<{SENDER}> recipients=<user@rcpt-550\.lab\.test> "
        r"status=ndr-queued",
        ndr,
    )
    assert found, ndr
    ndr_id = int(found.group(1))
    (delivered,) = lines.text("delivered")  # the NDR itself, into alice's mailbox
    assert delivered.startswith(f"id={ndr_id} to=<{SENDER}> connector=mailbox relay=mailbox ")
    (entry,) = lines.json("ndr-queued")
    assert (entry["id"], entry["ndr"], entry["to"]) == (queue_id, ndr_id, SENDER)


async def test_expiry_is_an_expired_line_with_the_last_code(relay: Relay, lines: Lines) -> None:
    queue_id = await submit(relay, to="user@refused.lab.test")
    await run_once(relay)
    advance(relay, EXPIRATION)
    await run_once(relay)
    (line,) = lines.text("expired")
    assert re.fullmatch(
        rf'id={queue_id} to=<user@refused\.lab\.test> connector="Lab refused" '
        r"delay=\d+\.\d attempts=1 code=\S+ status=expired \(550 .*\)",
        line,
    ), line
    (entry,) = lines.json("expired")
    assert float(str(entry["delay"])) >= EXPIRATION


async def test_client_text_is_escaped_and_values_with_spaces_quoted() -> None:
    line = Line(id=1, to="a\rb@x.test", connector='To "on" prem', status="deferred", reply="4\n")
    assert (
        str(line) == r'id=1 to=<a\x0db@x.test> connector="To \"on\" prem" status=deferred (4\x0a)'
    )
    assert Line(id=2, helo="", tls=None).__str__() == 'id=2 helo=""'
    assert Line(id=3, relay=("mx.test", None, None)).json_fields() == {"id": 3, "relay": "mx.test"}


# ---- [log] format ---------------------------------------------------------------------------


def test_log_format_is_validated_naming_the_key_and_the_values(tmp_path: Path) -> None:
    assert load(write_config(tmp_path, log={"format": "json"})).config.log.format is LogFormat.JSON
    with pytest.raises(ConfigError) as caught:
        load(write_config(tmp_path, name="bad.toml", log={"format": "xml"}))
    (problem,) = caught.value.problems
    assert problem.startswith('log.format = "xml": must be one of')
    assert "text" in problem and "json" in problem


# ---- relay serve -v -------------------------------------------------------------------------


async def test_verbose_shows_outbound_smtp_and_never_the_sql(tmp_path: Path, lab: FaultLab) -> None:
    """Logging set up as `relay serve -v` sets it up, around a real delivery."""
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("aiosqlite").level)
    listener = log_in_background(verbosity=1, format=LogFormat.TEXT, stream=out)
    try:
        async with manual_relay(lab_config(tmp_path, lab)) as relay:
            await submit(relay, to="user@good.lab.test")
            await run_once(relay)
    finally:
        listener.stop()
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        logging.getLogger("aiosqlite").setLevel(saved[2])
    text = out.getvalue()
    peer = f"{lab_name(Fault.GOOD)}[127.0.0.1]:{_port(lab, Fault.GOOD)}"
    assert f"relay.delivery: {peer} > MAIL FROM:<{SENDER}>" in text, text
    assert f"relay.delivery: {peer} > RCPT TO:<user@good.lab.test>" in text
    assert f"relay.delivery: {peer} < 250 2.6.0 Queued mail for delivery" in text
    assert f"relay.delivery: {peer} > STARTTLS" in text
    assert "mail.log" in text  # aiosmtpd's inbound session
    assert "status=delivered" in text
    for sql in ("PRAGMA", "SELECT", "INSERT", "aiosqlite"):
        assert sql not in text, f"{sql} in the -v log"


async def test_fix_now_is_a_failed_line_with_5_1_10(relay: Relay, lines: Lines) -> None:
    """Bob's on-premises mail waits; Fix now makes onprem.contoso.test authoritative and
    the next dispatch fails him as not found, without an attempt."""
    queue_id = await submit(relay, to="bob@onprem.contoso.test")
    await run_once(relay)
    (deferred,) = lines.text("deferred")
    assert f'id={queue_id} to=<bob@onprem.contoso.test> connector="To on-premises" ' in deferred
    assert relay.store is not None
    await admin.fix_now(relay.store, relay.loaded, ON_PREMISES)
    await relay.refresh()
    await run_once(relay)
    (line,) = lines.text("failed")
    assert re.fullmatch(
        rf'id={queue_id} to=<bob@onprem\.contoso\.test> connector="To on-premises" '
        r"delay=\d+\.\d attempts=1 code=5\.1\.10 status=failed "
        r"\(550 5\.1\.10 RESOLVER\.ADR\.RecipientNotFound; .*\)",
        line,
    ), line
    (entry,) = lines.json("failed")
    assert (entry["code"], entry["attempts"]) == ("5.1.10", 1)


async def test_serve_v_with_json_logs_both_directions_as_json_and_no_sql(
    tmp_path: Path, lab: FaultLab
) -> None:
    """A real `relay serve -v` with `[log] format = "json"`: every stderr line is one JSON
    object; the inbound session (mail.log) and the outbound one (relay.delivery) are in it,
    and no SQL."""
    port = free_port()
    config = lab_config(tmp_path, lab, smtp={"listen": f"{HOST}:{port}"}, log={"format": "json"})
    err = tmp_path / "serve.err"
    with err.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *relay_command("serve", "-v", config=config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            stdin=asyncio.subprocess.DEVNULL,
            env=cli_env(),
        )
    try:
        await poll(
            lambda: process.returncode is None and smtp_greets(HOST, port),
            timeout=20,
            what="relay serve -v greeting",
        )
        reply = await send_mail(port, rcpt_tos=["user@good.lab.test"], mail_from=SENDER)
        assert reply.startswith("250 "), reply
        await poll(
            lambda: '"status": "delivered"' in err.read_text("utf-8"),
            timeout=20,
            what="the delivered line",
        )
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 10)
    entries = [json.loads(line) for line in err.read_text("utf-8").splitlines()]
    loggers = {e["logger"] for e in entries}
    assert {"mail.log", "relay.delivery", "relay.intake", "relay.worker"} <= loggers, loggers
    outbound = [str(e["message"]) for e in entries if e["logger"] == "relay.delivery"]
    assert any(f"> MAIL FROM:<{SENDER}>" in m for m in outbound), outbound
    assert any(" < 250 " in m for m in outbound), outbound
    (delivered,) = [e for e in entries if e.get("status") == "delivered"]
    assert delivered["to"] == "user@good.lab.test" and delivered["level"] == "INFO"
    text = err.read_text("utf-8")
    for sql in ("PRAGMA", "SELECT ", "INSERT ", "aiosqlite"):
        assert sql not in text, f"{sql} in the -v log"


@pytest.mark.parametrize(
    ("verbosity", "smtp_in", "sql"),
    [(0, logging.WARNING, logging.WARNING), (1, logging.NOTSET, logging.WARNING), (2, 0, 0)],
    ids=["serve", "-v", "-vv"],
)
def test_verbosity_sets_the_session_and_sql_loggers(verbosity: int, smtp_in: int, sql: int) -> None:
    """`-v` lets aiosmtpd's session log through and keeps aiosqlite's SQL out; `-vv` lets
    every library's debug output through."""
    root = logging.getLogger()
    names = ("mail.log", "aiosqlite")
    saved = (root.level, list(root.handlers), [logging.getLogger(n).level for n in names])
    for name in names:
        logging.getLogger(name).setLevel(logging.NOTSET)
    listener = log_in_background(verbosity=verbosity, format=LogFormat.TEXT, stream=io.StringIO())
    try:
        assert root.level == (logging.INFO if verbosity == 0 else logging.DEBUG)
        assert logging.getLogger("mail.log").level == smtp_in
        assert logging.getLogger("aiosqlite").level == sql
    finally:
        listener.stop()
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        for name, level in zip(names, saved[2], strict=True):
            logging.getLogger(name).setLevel(level)
