"""Support for the lab-operations tests: the admin CLI, alerts, the clock and the walkthrough.

The in-process relay is tests.delivery_support's `manual_relay` (a ManualClock an hour
ahead of the CLI's real time); waits on a subprocess server use tests.helpers' `wait_for`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import struct
import subprocess
import termios
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.delivery_support import ClosedPort, maildir_messages
from tests.helpers import (
    HOST,
    CliResult,
    RelayProcess,
    cli_env,
    example_data,
    free_port,
    relay_command,
    relay_process,
    run_cli,
    run_main,
    write_config,
)

ON_PREMISES = "To on-premises"
SENDER = "alice@contoso.test"  # a local mailbox: its NDRs land in its Maildir
ADMIN = "admin@contoso.test"  # [alerts].notify in the example config
WIDTH = 100  # every table fits 100 columns (issue 4)
NOT_FOUND = "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
ACCESS_DENIED = "550 5.4.1 Recipient address rejected: Access denied"


# ---- configs --------------------------------------------------------------------------------


def closed_connectors(
    onprem: ClosedPort, partner: ClosedPort | None = None
) -> list[dict[str, Any]]:
    """The example's on-premises connector, pointed at a refused port (plus a partner one)."""
    connectors = [
        {
            **example_data()["connectors"][0],
            "smart_hosts": [f"{HOST}:{onprem.port}"],
            "tls": "none",
            "connect_timeout": "1s",
        }
    ]
    if partner is not None:
        connectors.append(
            {
                "name": "Partner fabrikam",
                "type": "partner",
                "recipient_domains": ["fabrikam.test"],
                "smart_hosts": [f"{HOST}:{partner.port}"],
                "tls": "none",
                "connect_timeout": "1s",
            }
        )
    return connectors


def ops_config(directory: Path, onprem: ClosedPort, **overrides: Any) -> Path:
    """The example config with on-premises at a refused port.

    DNS goes to a loopback port where nothing answers, so mail routed by MX (a disabled
    connector's) fails fast with a DNS error and never leaves the machine.
    """
    overrides.setdefault("connectors", closed_connectors(onprem))
    overrides.setdefault("dns", {"nameservers": [f"{HOST}:{free_port()}"], "timeout": "1s"})
    return write_config(directory, **overrides)


def serving_config(directory: Path, onprem: ClosedPort, **overrides: Any) -> Path:
    """`ops_config` listening on a fixed free port, for `relay serve` as a subprocess."""
    smtp = {"listen": f"{HOST}:{free_port()}", **overrides.pop("smtp", {})}
    return ops_config(directory, onprem, smtp=smtp, **overrides)


# ---- the relay, in-process and as a subprocess ------------------------------------------------


@contextlib.contextmanager
def served(config_path: Path) -> Iterator[RelayProcess]:
    """`relay serve` as a subprocess, killed on the way out."""
    with relay_process(config_path) as process:
        yield process


# ---- the CLI --------------------------------------------------------------------------------


async def cli(*args: str, config: Path | str) -> CliResult:
    """`python -m relay --config X ARGS` without blocking an in-process relay's loop."""
    return await asyncio.to_thread(run_cli, *args, config=config)


async def main_json(*args: str, config: Path | str) -> Any:
    """`relay ARGS --json` through relay.cli.main in a thread: the same code as the
    subprocess without its start-up time (for reads; actions go through `cli`)."""
    return parse_json(await asyncio.to_thread(run_main, *args, "--json", config=config))


def ok(result: CliResult) -> CliResult:
    assert result.code == 0, (
        f"exit {result.code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def parse_json(result: CliResult) -> Any:
    return json.loads(ok(result).stdout)


async def cli_json(*args: str, config: Path | str) -> Any:
    return parse_json(await cli(*args, "--json", config=config))


def assert_fits(text: str, width: int = WIDTH) -> None:
    wide = [line for line in text.splitlines() if len(line) > width]
    assert not wide, f"lines wider than {width} columns:\n" + "\n".join(wide)


def assert_uncut(text: str) -> None:
    """Nothing in a table was cut short (issue 12: the old tables ended cut fields with …)."""
    assert "…" not in text, text


def run_in_terminal(*args: str, config: Path | str, columns: int, lines: int = 50) -> CliResult:
    """`python -m relay --config X ARGS` with stdout on a real pseudo-terminal of `columns`
    columns (its window size set with TIOCSWINSZ, no COLUMNS variable); stderr is a pipe.
    The terminal's CRLF line ends come back as LF."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    env = {k: v for k, v in cli_env().items() if k not in ("COLUMNS", "LINES")}
    process = subprocess.Popen(
        relay_command(*args, config=config),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    _, err = process.communicate(timeout=30)
    out = b"".join(chunks).decode().replace("\r\n", "\n")
    return CliResult(process.returncode, out, err.decode())


def show(message_id: int, config: Path | str) -> dict[str, Any]:
    """`relay queue show ID --json` (synchronously, for polling a subprocess server)."""
    return parse_json(run_cli("queue", "show", str(message_id), "--json", config=config))  # type: ignore[no-any-return]


def statuses(message: dict[str, Any]) -> list[str]:
    return [r["status"] for r in message["recipients"]]


# ---- what the tests look at ---------------------------------------------------------------


def maildir_count(root: Path, address: str) -> int:
    return len(maildir_messages(root, address))


def ndr_statuses(root: Path, address: str) -> list[str]:
    """The `Status:` lines of the delivery reports in a local mailbox."""
    found: list[str] = []
    for message in maildir_messages(root, address):
        for part in message.walk():
            if part.get_content_type() == "message/delivery-status":
                for block in part.get_payload():
                    status = block.get("Status")
                    if status:
                        found.append(str(status))
    return found


def epoch(text: str) -> float:
    """An ISO 8601 time from the CLI's JSON ("...Z") as Unix seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
