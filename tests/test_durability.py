"""`relay serve` as a real process: a 250 is durable through SIGKILL, SIGTERM exits 0, and one
queue has one server."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    HOST,
    free_port,
    make_message,
    queued_id,
    relay_process,
    run_cli,
    send_mail_sync,
    start_relay_process,
    write_config,
)

pytestmark = pytest.mark.timeout(90)

ROUNDS = 20
CLIENTS = 3


def serve_config(directory: Path) -> Path:
    """A config on a fixed free port (a subprocess must know its port before it starts)."""
    return write_config(directory, smtp={"listen": f"{HOST}:{free_port()}"})


def queue_json(config: Path) -> list[dict[str, Any]]:
    code, out, err = run_cli("queue", "list", "--all", "--json", config=config)
    assert code == 0, err
    data: list[dict[str, Any]] = json.loads(out)
    return data


def test_sigkill_right_after_250_loses_nothing(tmp_path: Path) -> None:
    config = serve_config(tmp_path)
    with relay_process(config) as relay:
        with smtplib.SMTP(HOST, relay.port, timeout=10) as client:
            client.ehlo("client.fabrikam.test")
            client.mail("sender@fabrikam.test")
            client.rcpt("alice@contoso.test")
            client.rcpt("ops@onprem.contoso.test")
            code, message = client.data(make_message(subject="kill -9"))
            os.kill(relay.process.pid, signal.SIGKILL)  # the instant the 250 is in
        assert relay.process.wait(10) == -signal.SIGKILL
    queue_id = queued_id(f"{code} {message.decode()}")

    # The database alone (no server running) has it...
    code, out, err = run_cli("queue", "show", str(queue_id), "--json", config=config)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["id"] == queue_id
    assert shown["subject"] == "kill -9"
    assert [r["address"] for r in shown["recipients"]] == [
        "alice@contoso.test",
        "ops@onprem.contoso.test",
    ]
    # (The delivery worker may have had a go at them before the kill.)
    assert {r["status"] for r in shown["recipients"]} <= {"queued", "deferred", "delivered"}

    # ... and so does a restarted server, which goes on numbering after it.
    with relay_process(config) as relay:
        code, out, _ = run_cli("queue", "show", str(queue_id), "--json", config=config)
        assert code == 0
        assert json.loads(out)["subject"] == "kill -9"
        after = queued_id(send_mail_sync(relay.port, content=make_message(subject="after")))
        assert relay.stop() == 0
    assert after > queue_id
    subjects = {m["id"]: m["subject"] for m in queue_json(config)}
    assert (subjects[queue_id], subjects[after]) == ("kill -9", "after")


class Round:
    """Clients sending until `target` messages are acknowledged; then SIGKILL at once."""

    def __init__(self, pid: int, port: int, *, number: int, target: int) -> None:
        self.pid, self.port, self.number, self.target = pid, port, number, target
        self.acknowledged: dict[int, str] = {}  # queue id → subject
        self.lock = threading.Lock()
        self.killed = threading.Event()

    def run(self) -> None:
        threads = [threading.Thread(target=self.client, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not any(t.is_alive() for t in threads), "a client hung after the kill"
        self.kill()  # in case every client failed before the target

    def kill(self) -> None:
        with self.lock:
            if not self.killed.is_set():
                os.kill(self.pid, signal.SIGKILL)
                self.killed.set()

    def client(self, n: int) -> None:
        sent = 0
        while not self.killed.is_set():
            subject = f"round {self.number} client {n} message {sent}"
            sent += 1
            try:
                with smtplib.SMTP(HOST, self.port, timeout=10) as client:
                    client.ehlo(f"client{n}.fabrikam.test")
                    client.mail("sender@fabrikam.test")
                    client.rcpt("alice@contoso.test")
                    code, reply = client.data(make_message(subject=subject))
                    if code != 250:
                        continue
                    with self.lock:
                        self.acknowledged[queued_id(f"{code} {reply.decode()}")] = subject
                        enough = len(self.acknowledged) >= self.target
                    if enough:
                        self.kill()
            except (OSError, smtplib.SMTPException):
                return  # the server is gone


def test_repeated_sigkill_under_concurrent_load(tmp_path: Path) -> None:
    acknowledged: dict[int, str] = {}
    config = tmp_path / "config.toml"
    for number in range(ROUNDS):
        config = serve_config(tmp_path)  # a fresh port each round, the same queue
        relay = start_relay_process(config)
        try:
            round_ = Round(relay.process.pid, relay.port, number=number, target=1 + number % 5)
            round_.run()
            assert relay.process.wait(10) == -signal.SIGKILL
        finally:
            if relay.process.poll() is None:
                relay.kill()
        assert round_.acknowledged, f"round {number}: no message was acknowledged"
        acknowledged.update(round_.acknowledged)

    queued = {m["id"]: m for m in queue_json(config)}
    missing = sorted(set(acknowledged) - set(queued))
    assert not missing, f"acknowledged but lost after SIGKILL: {missing}"
    for queue_id, subject in acknowledged.items():
        assert queued[queue_id]["subject"] == subject, "a queue id was handed out twice"
    # Nothing partial: whatever is queued has its recipient.
    for message in queued.values():
        assert [r["address"] for r in message["recipients"]] == ["alice@contoso.test"]


def test_sigterm_exits_0_promptly_with_a_session_open(tmp_path: Path) -> None:
    config = serve_config(tmp_path)
    with relay_process(config) as relay:
        idle = socket.create_connection((HOST, relay.port), timeout=5)
        try:
            assert idle.recv(512).startswith(b"220")
            started = time.monotonic()
            relay.signal(signal.SIGTERM)
            assert relay.process.wait(5) == 0, relay.output()
            assert time.monotonic() - started < 5
        finally:
            idle.close()
    assert "Traceback" not in relay.output()


def test_sigint_exits_0(tmp_path: Path) -> None:
    config = serve_config(tmp_path)
    with relay_process(config) as relay:
        relay.signal(signal.SIGINT)
        assert relay.process.wait(5) == 0, relay.output()
    assert "Traceback" not in relay.output()


def test_second_server_on_the_same_queue_exits_1(tmp_path: Path) -> None:
    config = serve_config(tmp_path)
    with relay_process(config) as relay:
        code, out, err = run_cli("serve", config=config, timeout=20)
        assert code == 1, (out, err)
        assert "another relay is already serving" in err
        assert str(tmp_path / "queue" / "relay.db") in err
        assert "Traceback" not in err
        assert relay.process.poll() is None, "the first server must keep running"
        assert relay.stop() == 0


def test_port_in_use_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, smtp={"listen": f"{HOST}:{port}"})
        try:
            code, _, err = run_cli("serve", config=config, timeout=5)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"relay serve hung after failing to listen; stderr: {exc.stderr!r}")
    assert code == 1
    assert f"cannot listen on {HOST}:{port}" in err
    assert "Traceback" not in err


def test_unusable_certificate_exits_1_naming_it(tmp_path: Path) -> None:
    """A certificate file that exists but is not PEM passes `config check`; serve must say so."""
    (tmp_path / "lab.pem").write_text("not a certificate\n")
    (tmp_path / "lab.key").write_text("not a key\n")
    config = write_config(
        tmp_path,
        smtp={
            "listen": f"{HOST}:{free_port()}",
            "tls_certificate": "lab.pem",
            "tls_key": "lab.key",
        },
    )
    try:
        code, _, err = run_cli("serve", config=config, timeout=5)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"relay serve hung after failing to start; stderr: {exc.stderr!r}")
    assert code == 1
    assert "Traceback" not in err
    assert "lab.pem" in err, err
