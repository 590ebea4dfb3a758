"""Issue 4, section 6: the README's "A lab session, step by step", run as written.

Every command between the walkthrough markers runs in a fresh directory, with two changes a
test needs: the ports 2525 (the relay) and 2700 (the lab's base port) become free ports, and
`. .venv/bin/activate` becomes the venv's bin directory first on PATH. `relay lab faults` and
`relay ... serve` run in the background until the end. Where a person would look before
typing the next command (the queue after the swaks runs, the NDRs after the clock moves),
the test waits with a deadline for what the README says they will see.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    EXAMPLE_CONFIG,
    REPO,
    cli_env,
    free_port,
    require_program,
    run_main,
    smtp_greets,
    wait_for,
)
from tests.ops_support import ndr_statuses

pytestmark = [pytest.mark.swaks, pytest.mark.timeout(120)]

README = REPO / "README.md"
BEGIN, END = "<!-- walkthrough:begin -->", "<!-- walkthrough:end -->"
ACTIVATE = ". .venv/bin/activate"
STUCK = {"To on-premises": "4.4.316", "Lab timeout": "4.4.315", "Lab cert-expired": "4.7.320"}
LAB_PORTS = 13  # twelve fault endpoints and the DNS server (relay.lab.faults.lab_ports)


def walkthrough_commands(text: str) -> list[str]:
    """The command lines between the markers: no fences, comments or blank lines."""
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    lines = [line.strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "```"))]


def free_port_range(count: int) -> int:
    """A base port with `count` consecutive ports free for TCP and UDP on 127.0.0.1."""
    for _ in range(50):
        base = free_port()
        if base + count > 65535:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                        sock = held.enter_context(socket.socket(socket.AF_INET, kind))
                        sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


@dataclass
class Session:
    """The terminals: a working directory, an environment, the background processes."""

    cwd: Path
    env: dict[str, str]
    relay_port: int
    background: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)

    def run(self, command: str, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # A glob needs a shell (the grep on the Maildir); everything else runs without one.
        argv = ["bash", "-c", command] if "*" in command else shlex.split(command)
        done = subprocess.run(
            argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        self.transcript.append(f"$ {command}\n[exit {done.returncode}]\n{done.stdout}{done.stderr}")
        return done

    def start(self, command: str, name: str) -> Path:
        log = self.cwd / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                shlex.split(command),
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.background.append((process, log))
        self.transcript.append(f"$ {command} &  (pid {process.pid}, log {log.name})")
        return log

    def alive(self, log: Path) -> bool:
        process = next(p for p, path in self.background if path == log)
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{log.read_text()}")
        return True

    def start_lab(self, command: str) -> None:
        log = self.start(command, "lab")
        wait_for(
            lambda: (
                self.alive(log)
                and (self.cwd / "lab.toml").exists()
                and "# lab running" in log.read_text()
            ),
            timeout=20,
            what="the lab running and lab.toml written",
        )

    def start_relay(self, command: str) -> None:
        log = self.start(command, "serve")
        wait_for(
            lambda: self.alive(log) and smtp_greets("127.0.0.1", self.relay_port),
            timeout=20,
            what="the relay greeting with 220",
        )

    def wait_until_stuck(self) -> None:
        """After the swaks runs, until each failing route shows its mail flow code."""
        wait_for(
            lambda: STUCK.items() <= _codes(self.relay("queue", "digest")).items(),
            timeout=20,
            what=f"the digest showing {STUCK}",
        )

    def wait_for_fix_now(self) -> None:
        """Fix now reaches the server within about a second (its watcher); a person takes
        longer to type the next command. Bob's message (ID 1) failing shows it arrived."""
        wait_for(
            lambda: self.relay("queue", "show", "1")["recipients"][0]["status"] == "failed",
            timeout=10,
            what="Fix now picked up by the server (bob's message failed)",
        )

    def wait_for_ndrs(self) -> None:
        """After `clock advance 48h`: both deferred messages expired, three NDRs for alice."""
        wait_for(
            lambda: (
                len(self.relay("queue", "list", "--status", "expired")) == 2
                and len(ndr_statuses(self.mailboxes, "alice@contoso.test")) == 3
            ),
            timeout=15,
            what="two expired messages and three NDRs in alice's Maildir",
        )

    @property
    def mailboxes(self) -> Path:
        return self.cwd / "lab-queue" / "mailboxes"  # lab.toml's own spool (issue 12)

    def relay(self, *args: str) -> Any:
        """`relay --config lab.toml ARGS --json`, in this process (for waiting only)."""
        result = run_main(*args, "--json", config=self.cwd / "lab.toml")
        assert result.code == 0, result
        return json.loads(result.stdout)

    def report(self) -> None:
        """What a failure needs: the transcript, the queue, the NDRs, the servers' logs."""
        print("\n".join(self.transcript))
        with contextlib.suppress(Exception):
            print(json.dumps(self.relay("queue", "list"), indent=1))
        print("NDR statuses:", ndr_statuses(self.mailboxes, "alice@contoso.test"))
        for _, log in self.background:
            print(f"--- {log.name}\n{log.read_text(errors='replace')}")

    def stop(self) -> None:
        for process, _ in reversed(self.background):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in self.background:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    relay_port = free_port()
    config = EXAMPLE_CONFIG.read_text("utf-8")
    assert 'listen = "127.0.0.1:2525"' in config
    config = config.replace('listen = "127.0.0.1:2525"', f'listen = "127.0.0.1:{relay_port}"')
    (tmp_path / "config.toml").write_text(config, "utf-8")
    env = cli_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("VIRTUAL_ENV", None)
    started = Session(cwd=tmp_path, env=env, relay_port=relay_port)
    try:
        yield started
    finally:
        started.stop()


def test_the_readme_walkthrough_works_as_written(session: Session) -> None:
    require_program("swaks")
    began = time.monotonic()
    base = free_port_range(LAB_PORTS)
    commands = walkthrough_commands(README.read_text("utf-8"))
    assert commands[0] == ACTIVATE
    commands = [
        c.replace("2525", str(session.relay_port)).replace("2700", str(base)) for c in commands[1:]
    ]
    assert sum(c.startswith("swaks ") for c in commands) == 5, commands
    last_swaks_into_trouble = max(
        i for i, c in enumerate(commands) if c.startswith("swaks ") and "nobody@" not in c
    )
    outputs: dict[str, str] = {}
    try:
        for index, command in enumerate(commands):
            outputs[command] = step(session, command)
            if index == last_swaks_into_trouble:
                session.wait_until_stuck()
    except BaseException:
        session.report()
        raise

    by_verb = {c.split(" --server")[0]: out for c, out in outputs.items()}
    digest = by_verb["relay --config lab.toml queue digest"]
    for connector, code in STUCK.items():
        assert re.search(rf"^{re.escape(connector)}\s.*\s{re.escape(code)}\s", digest, re.M), digest
    alerts = json.loads(by_verb["relay --config lab.toml alerts --json"])
    (onprem,) = [a for a in alerts if a["connector"] == "To on-premises"]
    assert (onprem["code"], onprem["fix_now"]) == ("4.4.316", True)
    lab_log = (session.cwd / "lab.log").read_text()
    assert "[[connectors]]" not in lab_log and lab_log.count(".lab.test") >= LAB_PORTS, lab_log
    assert not (session.cwd / "queue").exists(), "the lab uses its own spool (lab-queue/)"
    listed = by_verb["relay --config lab.toml mailbox list alice@contoso.test"]
    assert listed.count("Undeliverable: ") == 3, listed
    shown = by_verb["relay --config lab.toml mailbox show alice@contoso.test 1"]
    assert "Delivery status:" in shown and "Action:           failed" in shown, shown
    grep = next(out for c, out in outputs.items() if c.startswith("grep "))
    assert sorted(grep.split()) == sorted(
        ["Status:", "5.1.10", "Status:", "5.4.315", "Status:", "5.7.320"]
    ), grep
    assert_server_log(session.cwd / "serve.log")
    assert time.monotonic() - began < 60


def assert_server_log(path: Path) -> None:
    """The server's log says what happened to bob's message (ID 1), a line per step: each
    attempt deferred with 4.4.316, the failure after Fix now, and the NDR to alice."""
    text = path.read_text("utf-8", errors="replace")
    bob = "id=1 to=<bob@onprem.contoso.test> "
    deferred = [line for line in text.splitlines() if bob in line and "status=deferred" in line]
    assert deferred, text
    for attempts, line in enumerate(deferred, start=1):
        assert f" attempts={attempts} code=4.4.316 status=deferred " in line, line
    assert re.search(rf"{re.escape(bob)}.* code=5\.1\.10 status=failed \(550 5\.1\.10 ", text)
    assert re.search(r"id=1 ndr=\d+ to=<alice@contoso\.test> .*status=ndr-queued", text), text


def step(session: Session, command: str) -> str:
    """Run one walkthrough command as the README means it; returns its output."""
    if command.startswith("relay lab faults"):
        session.start_lab(command)
        return ""
    if command.endswith(" serve"):
        session.start_relay(command)
        return ""
    rejected = command.startswith("swaks ") and "nobody@" in command
    if rejected:
        session.wait_for_fix_now()
    done = session.run(command)
    if rejected:
        assert done.returncode != 0, done.stdout  # swaks exits 24: RCPT rejected
        assert "550 5.4.1 Recipient address rejected: Access denied" in done.stdout
    else:
        assert done.returncode == 0, f"{command}: exit {done.returncode}"
    if command.endswith("clock advance 48h"):
        session.wait_for_ndrs()
    return done.stdout


def _codes(rows: list[dict[str, Any]]) -> dict[str, str]:
    """connector → code for the digest rows that have one."""
    return {row["connector"]: row["code"] for row in rows if row["code"]}
