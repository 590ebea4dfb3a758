#!/usr/bin/env python3
"""Benchmark `relay serve` against a private Postfix instance, in one invocation (issue 6).

    .venv/bin/python bench/relay_vs_postfix.py --messages 5000 --rounds 3

Everything runs on loopback on this machine:

* the destination is Postfix's ``smtp-sink``, started afresh for every run on a free
  port, dumping every transaction to its own file (``-d``) and printing running
  counters (``-c``);
* system A is ``relay --config <run>/relay.toml serve`` with one connector,
  "Bench sink", for ``sink.bench.test`` pointing at the sink;
* system B is a private Postfix instance with its own temporary config_directory,
  queue_directory and data_directory (``postfix -c <run>/postfix start``), smtpd on a
  free loopback port and ``relayhost = [127.0.0.1]:<sink port>``. Nothing under
  /etc/postfix is read or written (``postfix -c DIR`` run as root does not need
  ``alternate_config_directories``), port 25 is never used;
* A and B alternate (A B A B ...), a fresh instance with an empty queue per run.

Each run has two phases:

1. throughput: ``smtp-source -s 20 -m N -l 2048 -N`` (N 2 KB messages, 20 parallel
   sessions, a new session per message, a unique recipient ``<n>bench@sink.bench.test``
   per message). Intake msg/s = N / smtp-source's wall time. End-to-end msg/s = N /
   (time from the start of smtp-source until the sink has counted N messages and the
   system's queue is empty);
2. latency: this script's own asyncio client (``latency-client`` sub-command, run as a
   separate process) with 20 persistent sessions, timing each message from sending
   MAIL FROM to the 250 reply after the final "."; recipients ``lat-<n>@sink.bench.test``
   and an ``X-Bench-Id`` header. p50/p99 come from this phase only.

Exactly once: after each run the sink is stopped and every dump file is parsed. The
multiset of envelope recipients must be exactly {1..N}bench plus {0..L-1}lat
(every acknowledged message delivered, none twice, nothing else), and the
X-Bench-Id header of each latency message must match its recipient. smtp-source
aborts (non-zero exit) on any reply that is not 2xx, so exit 0 means all N were
acknowledged; the latency client records which messages got a 250 and only those
are expected.

Needs root (Postfix's master and smtp-sink's -u) and the Debian package postfix.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

SINK_DOMAIN = "sink.bench.test"
SENDER = "bench@source.bench.test"
REPO = Path(__file__).resolve().parent.parent
RCPT_ARG = re.compile(rb"^X-Rcpt-Args: <([^>]*)>", re.M)
BENCH_ID = re.compile(rb"^X-Bench-Id: (\S+)", re.M)
POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
            s.settimeout(2)
            banner = s.recv(512)
            if banner.startswith(b"220"):
                s.sendall(b"QUIT\r\n")
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered 220 on 127.0.0.1:{port} within {timeout:.0f}s")


def cmdline(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


# --------------------------------------------------------------------------- the sink


class Sink:
    """smtp-sink on 127.0.0.1:<free port>, one dump file per transaction, live counter."""

    def __init__(self, dump_dir: Path, extra: list[str]) -> None:
        self.dump_dir = dump_dir
        self.port = free_port()
        self.count = 0
        self._target = -1
        self._reached: float | None = None
        self._cond = threading.Condition()
        dump_dir.mkdir(parents=True)
        self.argv = ["smtp-sink", "-c", *extra, "-d", f"{dump_dir}/"]
        if os.geteuid() == 0:
            shutil.chown(dump_dir, "postfix")
            self.argv[1:1] = ["-u", "postfix"]
        self.argv += [f"127.0.0.1:{self.port}", "256"]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_listening(self.port, 10, self.proc)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        pending = b""
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            pending += chunk
            *records, pending = re.split(rb"[\r\n]", pending)
            for rec in reversed(records):
                m = re.search(rb"mesg=(\d+)", rec)
                if m:
                    self._update(int(m.group(1)))
                    break

    def _update(self, n: int) -> None:
        now = time.monotonic()
        with self._cond:
            if n > self.count:
                self.count = n
                if self._reached is None and 0 <= self._target <= n:
                    self._reached = now
                self._cond.notify_all()

    def wait_for(self, target: int, timeout: float) -> float | None:
        """Monotonic time at which the counter reached target (None on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._target = target
            if self.count >= target and self._reached is None:
                self._reached = time.monotonic()
            while self._reached is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))
            reached, self._reached, self._target = self._reached, None, -1
            return reached

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)

    def audit(self, expected: set[str], optional: set[str]) -> dict[str, object]:
        """Every expected recipient exactly once, optional ones at most once, nothing else."""
        seen: Counter[str] = Counter()
        bad_ids = 0
        files = 0
        for path in self.dump_dir.iterdir():
            files += 1
            data = path.read_bytes()
            head = data[: data.find(b"\n\n") + 1 or len(data)]
            rcpts = [r.decode("utf-8", "replace") for r in RCPT_ARG.findall(head)]
            seen.update(rcpts)
            bid = BENCH_ID.search(data)
            if bid and rcpts and rcpts[0] != bid.group(1).decode():
                bad_ids += 1
        missing = expected - seen.keys()
        dupes = {r: c for r, c in seen.items() if c > 1}
        unexpected = seen.keys() - expected - optional
        ok = not missing and not dupes and not unexpected and bad_ids == 0
        return {
            "ok": ok,
            "files": files,
            "delivered": sum(seen.values()),
            "expected": len(expected),
            "missing": len(missing),
            "duplicated": len(dupes),
            "unexpected": len(unexpected),
            "unconfirmed_delivered": len(seen.keys() & optional),
            "unconfirmed": len(optional),
            "bad_bench_id": bad_ids,
            "examples": sorted(missing)[:3] + sorted(dupes)[:3] + sorted(unexpected)[:3],
        }


# --------------------------------------------------------------------------- the systems


class RelaySystem:
    name = "relay"

    def __init__(self, workdir: Path, sink_port: int, relay_bin: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.relay_bin = relay_bin
        self.config = workdir / "relay.toml"
        self.config.write_text(RELAY_TOML.format(port=self.port, sink=sink_port, dir=workdir))
        self.argv = [relay_bin, "--config", str(self.config), "serve"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss_kb: int | None = None

    def start(self) -> None:
        self.logf = open(self.workdir / "relay.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, stdout=self.logf, stderr=subprocess.STDOUT)
        try:
            wait_listening(self.port, 30, self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; log: {self.log_tail()}") from None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "relay.log").read_text(errors="replace")[-1500:]
        return ""

    def queue_empty(self) -> bool:
        for status in ("queued", "deferred"):
            argv = [
                self.relay_bin,
                "--config",
                str(self.config),
                "queue",
                "list",
                "--limit",
                "1",
                "--status",
                status,
                "--json",
            ]
            out = subprocess.run(argv, capture_output=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"{cmdline(argv)} failed: {out.stderr.decode()[-500:]}")
            data = json.loads(out.stdout or b"[]")
            if isinstance(data, dict):  # tolerate {"messages": [...]}
                data = data.get("messages", [])
            if data:
                return False
        return True

    def sample_rss(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kb = int(line.split()[1])

    def stop(self) -> None:
        if self.proc is None:
            return
        self.sample_rss()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                log("relay did not stop within 20s of SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        self.proc = None

    def commands(self) -> list[str]:
        return [cmdline(self.argv)]


RELAY_TOML = """\
# generated by bench/relay_vs_postfix.py: the issue 2 schema, values changed only
[smtp]
listen = "127.0.0.1:{port}"
hostname = "relay.bench.test"
max_message_size = "35MB"
max_recipients = 500
relay_networks = ["127.0.0.0/8", "::1/128"]
require_tls = false

[queue]
path = "{dir}/queue/relay.db"
message_expiration = "48h"
retry_schedule = ["1m", "5m", "15m", "30m", "1h"]
retention = "7d"

[dns]
nameservers = []
timeout = "5s"

[mailboxes]
path = "{dir}/queue/mailboxes"

[[accepted_domains]]
name = "contoso.test"
type = "authoritative"
mailboxes = ["admin@contoso.test"]

[[connectors]]
name = "Bench sink"
type = "on_premises"
recipient_domains = ["sink.bench.test"]
smart_hosts = ["127.0.0.1:{sink}"]
use_mx = false
tls = "none"
tls_domain = ""
ca_file = ""
connect_timeout = "30s"
enabled = true

[alerts]
notify = ["admin@contoso.test"]
threshold = 200
after = "1h"
"""


class PostfixSystem:
    name = "postfix"

    def __init__(self, workdir: Path, sink_port: int, overrides: list[str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.conf = workdir / "postfix"
        self.overrides = overrides
        self.queue = workdir / "postfix-queue"
        self.data = workdir / "postfix-data"
        self.conf.mkdir()
        self.queue.mkdir()
        self.data.mkdir(mode=0o700)
        shutil.chown(self.data, "postfix", "postfix")
        (self.conf / "main.cf").write_text(
            POSTFIX_MAIN_CF.format(
                queue=self.queue, data=self.data, workdir=workdir, sink=sink_port
            )
            + "".join(f"{o}\n" for o in overrides)
        )
        (self.conf / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=self.port))
        self.peak_rss_kb = None

    def _postfix(self, *args: str) -> None:
        argv = ["postfix", "-c", str(self.conf), *args]
        out = subprocess.run(argv, capture_output=True, timeout=120)
        if out.returncode != 0:
            # postfix(1) only logs to syslog/maillog_file when stderr is not a terminal
            raise RuntimeError(
                f"{cmdline(argv)} exited {out.returncode}: {out.stderr.decode()} {self.log_tail()}"
            )

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "postfix.log").read_text(errors="replace")[-1500:]
        return ""

    def start(self) -> None:
        self._postfix("start")
        wait_listening(self.port, 30)

    def queue_empty(self) -> bool:
        # What `postqueue -c DIR -p` shows, without a showq round trip per poll.
        for sub in POSTFIX_QUEUES:
            with contextlib.suppress(FileNotFoundError):
                for _root, _dirs, files in os.walk(self.queue / sub):
                    if files:
                        return False
        return True

    def sample_rss(self) -> None:
        pass

    def stop(self) -> None:
        pidfile = self.queue / "pid" / "master.pid"
        with contextlib.suppress(RuntimeError):
            self._postfix("stop")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, 0)
            except (OSError, ValueError):
                return
            time.sleep(0.1)
        log("postfix master still running 20s after `postfix stop`")

    def commands(self) -> list[str]:
        key = ("relayhost", "inet_interfaces", "mynetworks", "in_flow_delay")
        main_cf = [
            ln
            for ln in (self.conf / "main.cf").read_text().splitlines()
            if ln.split("=")[0].strip() in key or ln in self.overrides
        ]
        return [
            cmdline(["postfix", "-c", str(self.conf), "start"]),
            "# main.cf (excerpt): " + "; ".join(main_cf),
            f"# smtpd on 127.0.0.1:{self.port}; main.cf and master.cf in {self.conf}",
            f"# queue empty: no file under {self.queue}/{{{','.join(POSTFIX_QUEUES)}}}"
            f" (what `postqueue -c {self.conf} -p` would list)",
        ]


POSTFIX_MAIN_CF = """\
# generated by bench/relay_vs_postfix.py: a private instance, nothing shared with /etc/postfix
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
relay_domains =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [127.0.0.1]:{sink}
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file_prefixes = {workdir}
maillog_file = {workdir}/postfix.log
biff = no
append_dot_mydomain = no
"""

# Debian's master.cf minus the pipe/local services, chroot off, smtpd on a loopback port.
POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


# --------------------------------------------------------------------------- the latency client


def message_bytes(rcpt: str, bench_id: str, size: int) -> bytes:
    line = b"X" * 76 + b"\r\n"
    body = (line * (size // len(line) + 1))[:size]
    if not body.endswith(b"\r\n"):
        body = body[:-2] + b"\r\n"
    head = (
        f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: bench {bench_id}\r\n"
        f"X-Bench-Id: {bench_id}\r\n\r\n"
    ).encode()
    return head + body + b".\r\n"


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)


async def latency_client(
    host: str, port: int, messages: int, sessions: int, size: int, prefix: str
) -> dict[str, object]:
    ids = iter(range(messages))
    latencies: list[float] = []
    acked: list[int] = []
    unconfirmed: set[int] = set()  # "." sent, connection lost before the reply
    errors: list[str] = []

    async def session() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await _reply(reader)
            writer.write(b"EHLO bench-client.bench.test\r\n")
            await _reply(reader)
            for n in ids:
                rcpt = f"{prefix}-{n}@{SINK_DOMAIN}"
                data = message_bytes(rcpt, rcpt, size)
                t0 = time.perf_counter()
                writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
                code, text = await _reply(reader)
                if code == 250:
                    writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
                    code, text = await _reply(reader)
                if code == 250:
                    writer.write(b"DATA\r\n")
                    code, text = await _reply(reader)
                if code == 354:
                    writer.write(data)
                    unconfirmed.add(n)
                    code, text = await _reply(reader)
                    unconfirmed.discard(n)
                if code == 250:
                    latencies.append(time.perf_counter() - t0)
                    acked.append(n)
                else:
                    errors.append(text.decode(errors="replace").strip())
                    writer.write(b"RSET\r\n")
                    await _reply(reader)
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(ConnectionError):
                await _reply(reader)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    t0 = time.perf_counter()
    results = await asyncio.gather(*(session() for _ in range(sessions)), return_exceptions=True)
    wall = time.perf_counter() - t0
    errors += [repr(r) for r in results if isinstance(r, BaseException)]
    return {
        "sent": messages,
        "acked": acked,
        "unconfirmed": sorted(unconfirmed),
        "errors": errors[:10],
        "error_count": len(errors),
        "wall": wall,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=0) * 1000,
    }


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    system: str
    round: int
    messages: int
    intake_s: float = float("nan")
    e2e_s: float = float("nan")
    intake_rate: float = float("nan")
    e2e_rate: float = float("nan")
    lat_messages: int = 0
    lat_rate: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    peak_rss_mb: float | None = None
    exactly_once: bool = False
    audit: dict[str, object] = field(default_factory=dict)
    error: str = ""


def wait_drained(
    system: RelaySystem | PostfixSystem, sink: Sink, target: int, timeout: float
) -> float | None:
    """When the sink has counted target messages and the queue is empty (monotonic)."""
    before = sink.count
    reached = sink.wait_for(target, min(timeout, 20))
    if reached is None and sink.count == before:
        log(
            f"{system.name}: the sink has received nothing for 20 s; if the relay's log shows "
            "'did not answer MAIL in time', its client pipelines MAIL/RCPT without ending the "
            "group with DATA (RFC 2920 3.1) and smtp-sink holds the replies: "
            "try --sink-option=-p"
        )
    if reached is None and timeout > 20:
        reached = sink.wait_for(target, timeout - 20)
    if reached is None:
        return None
    deadline = time.monotonic() + timeout
    first = True
    while time.monotonic() < deadline:
        if system.queue_empty():
            # The clock stops at the sink's count unless the queue was seen non-empty after it.
            return reached if first else time.monotonic()
        first = False
        time.sleep(0.05)
    return None


def one_run(
    kind: str, rnd: int, args: argparse.Namespace, base: Path, commands: dict[str, list[str]]
) -> Run:
    run = Run(kind, rnd, args.messages)
    workdir = base / f"{kind}-{rnd}"
    workdir.mkdir()
    sink = Sink(args.sink_root / f"sink-{kind}-{rnd}", args.sink_option)
    system: RelaySystem | PostfixSystem = (
        RelaySystem(workdir, sink.port, args.relay_bin)
        if kind == "relay"
        else PostfixSystem(workdir, sink.port, args.postfix_set)
    )
    expected: set[str] = set()
    optional: set[str] = set()
    try:
        system.start()
        commands.setdefault("smtp-sink", [cmdline(sink.argv)])
        commands.setdefault(kind, system.commands())
        # phase 1: throughput with smtp-source
        src = [
            "smtp-source",
            "-s",
            str(args.sessions),
            "-m",
            str(args.messages),
            "-l",
            str(args.size),
            "-N",
            "-f",
            SENDER,
            "-t",
            f"bench@{SINK_DOMAIN}",
            "-M",
            "source.bench.test",
            f"127.0.0.1:{system.port}",
        ]
        if args.reuse:
            src.insert(1, "-d")
        commands.setdefault(f"smtp-source ({kind})", [cmdline(src)])
        t0 = time.monotonic()
        out = subprocess.run(src, capture_output=True, timeout=args.timeout)
        t1 = time.monotonic()
        if out.returncode != 0:
            raise RuntimeError(f"smtp-source exited {out.returncode}: {out.stderr.decode()[-400:]}")
        expected |= {f"{i}bench@{SINK_DOMAIN}" for i in range(1, args.messages + 1)}
        run.intake_s = t1 - t0
        run.intake_rate = args.messages / run.intake_s
        done = wait_drained(system, sink, args.messages, args.timeout)
        system.sample_rss()
        if done is None:
            raise RuntimeError(f"not drained within {args.timeout}s: sink counted {sink.count}")
        run.e2e_s = done - t0
        run.e2e_rate = args.messages / run.e2e_s
        # phase 2: per-message accept latency with the asyncio client
        if args.latency_messages:
            lat = [
                sys.executable,
                str(Path(__file__).resolve()),
                "latency-client",
                "--port",
                str(system.port),
                "--messages",
                str(args.latency_messages),
                "--sessions",
                str(args.sessions),
                "--size",
                str(args.size),
                "--prefix",
                "lat",
            ]
            commands.setdefault(f"latency client ({kind})", [cmdline(lat)])
            out = subprocess.run(lat, capture_output=True, timeout=args.timeout)
            if out.returncode != 0:
                raise RuntimeError(f"latency client failed: {out.stderr.decode()[-800:]}")
            res = json.loads(out.stdout)
            acked = res["acked"]
            expected |= {f"lat-{n}@{SINK_DOMAIN}" for n in acked}
            optional |= {f"lat-{n}@{SINK_DOMAIN}" for n in res["unconfirmed"]}
            run.lat_messages = len(acked)
            run.lat_rate = len(acked) / res["wall"]
            run.p50_ms, run.p99_ms = res["p50_ms"], res["p99_ms"]
            if res["error_count"]:
                run.error = f"latency client: {res['error_count']} errors, e.g. {res['errors'][:2]}"
            target = args.messages + len(acked)
            if wait_drained(system, sink, target, args.timeout) is None:
                raise RuntimeError(f"latency phase not drained: sink counted {sink.count}")
        system.sample_rss()
        time.sleep(0.3)  # let the sink finish writing the last dump file
    except Exception as exc:  # report it and go on with the next run
        run.error = (run.error + "; " if run.error else "") + str(exc)
        log(f"{kind} round {rnd}: {exc}")
    finally:
        system.stop()
        sink.stop()
    if kind == "relay" and system.peak_rss_kb:
        run.peak_rss_mb = system.peak_rss_kb / 1024
    run.audit = sink.audit(expected, optional)
    run.exactly_once = bool(run.audit["ok"]) and not run.error
    if run.error or not run.audit["ok"]:
        keep = base.parent / f"{base.name}-failed-{kind}-{rnd}"
        shutil.copytree(
            workdir,
            keep,
            ignore=shutil.ignore_patterns("*.db*", "postfix-queue"),
            dirs_exist_ok=True,
        )
        shutil.copytree(sink.dump_dir, keep / "sink-dump", dirs_exist_ok=True)
        log(f"{kind} round {rnd} failed; its config, log and the sink's dump are kept in {keep}")
    if not args.keep:
        shutil.rmtree(sink.dump_dir, ignore_errors=True)
    return run


# --------------------------------------------------------------------------- report


def fmt(v: float | None, spec: str = ".0f") -> str:
    if v is None or v != v:  # None or NaN
        return "-"
    return format(v, spec)


def report(runs: list[Run], args: argparse.Namespace, commands: dict[str, list[str]]) -> str:
    lines = ["## Commands (round 1; later rounds differ only in ports and directories)", ""]
    lines.append(f"    {cmdline([sys.executable, *sys.argv])}")
    for what, cmds in commands.items():
        lines.append(f"    # {what}")
        lines += [f"    {c}" for c in cmds]
    lines += [
        "",
        f"## Runs ({args.messages} messages of {args.size} bytes, "
        f"{args.sessions} sessions; latency phase {args.latency_messages} messages)",
        "",
        "| run | system | intake msg/s | end-to-end msg/s | latency p50 ms | p99 ms "
        "| client msg/s | peak RSS MB | exactly once |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        au = r.audit
        extra = au.get("unconfirmed_delivered")
        once = (
            f"yes{f' (+{extra} unacknowledged, delivered once)' if extra else ''}"
            if r.exactly_once
            else f"NO ({au.get('delivered')}/{au.get('expected')} delivered, missing "
            f"{au.get('missing')}, dup {au.get('duplicated')}, extra {au.get('unexpected')}"
            f"{'; ' + r.error if r.error else ''})"
        )
        lines.append(
            f"| {r.round} | {r.system} | {fmt(r.intake_rate)} | {fmt(r.e2e_rate)} | "
            f"{fmt(r.p50_ms, '.1f')} | {fmt(r.p99_ms, '.1f')} | {fmt(r.lat_rate)} | "
            f"{fmt(r.peak_rss_mb, '.0f')} | {once} |"
        )
    pairs = []
    for rnd in range(1, args.rounds + 1):
        a = next((r for r in runs if r.system == "relay" and r.round == rnd), None)
        b = next((r for r in runs if r.system == "postfix" and r.round == rnd), None)
        if a and b:
            pairs.append((rnd, a, b))
    if pairs:
        lines += [
            "",
            "## relay / Postfix, per round",
            "",
            "| metric | " + " | ".join(f"round {p[0]}" for p in pairs) + " | median | min | max |",
            "|---|" + "---:|" * (len(pairs) + 3),
        ]
        for label, attr, inverse in (
            ("intake msg/s", "intake_rate", False),
            ("end-to-end msg/s", "e2e_rate", False),
            ("latency p50 (Postfix/relay)", "p50_ms", True),
            ("latency p99 (Postfix/relay)", "p99_ms", True),
        ):
            ratios = []
            for _, a, b in pairs:
                x, y = getattr(a, attr), getattr(b, attr)
                ratios.append(y / x if inverse else x / y)
            good = [v for v in ratios if v == v]
            cells = [fmt(v, ".2f") for v in ratios]
            summary = (
                [fmt(statistics.median(good), ".2f"), fmt(min(good), ".2f"), fmt(max(good), ".2f")]
                if good
                else ["-"] * 3
            )
            lines.append(f"| {label} | " + " | ".join(cells + summary) + " |")
        lines.append("")
        lines.append("Latency ratios are Postfix/relay, so above 1 means the relay answers faster.")
    all_once = bool(runs) and all(r.exactly_once for r in runs)
    lines += [
        "",
        f"Exactly once (every acknowledged message delivered once, nothing else): "
        f"{'yes, in every run' if all_once else 'NO - see the table' if runs else 'no runs'}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def preflight(args: argparse.Namespace) -> None:
    need = ["smtp-sink", "smtp-source"]
    if "postfix" in args.systems:
        need += ["postfix", "postqueue"]
        if os.geteuid() != 0:
            sys.exit("the private Postfix instance needs root (its master runs as root)")
    missing = [b for b in need if not shutil.which(b)]
    if missing:
        sys.exit(
            f"missing {', '.join(missing)}: install the Debian package postfix "
            "(DEBIAN_FRONTEND=noninteractive apt-get install -y postfix)"
        )
    relay_found = shutil.which(args.relay_bin) or Path(args.relay_bin).exists()
    if "relay" in args.systems and not relay_found:
        sys.exit(f"relay executable {args.relay_bin!r} not found (make test creates .venv)")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd")
    lc = sub.add_parser("latency-client", help="the asyncio load generator on its own")
    lc.add_argument("--host", default="127.0.0.1")
    lc.add_argument("--port", type=int, required=True)
    lc.add_argument("--messages", type=int, default=1000)
    lc.add_argument("--sessions", type=int, default=20)
    lc.add_argument("--size", type=int, default=2048)
    lc.add_argument("--prefix", default="lat")
    p.add_argument("--messages", type=int, default=5000, help="N per run (default 5000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each system once (default 3)")
    p.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (20)")
    p.add_argument("--size", type=int, default=2048, help="message payload bytes (2048)")
    p.add_argument(
        "--latency-messages",
        type=int,
        default=None,
        help="messages in the latency phase (default: same as --messages; 0 skips it)",
    )
    p.add_argument(
        "--systems",
        default="relay,postfix",
        help="comma-separated, in run order within a round (relay,postfix)",
    )
    p.add_argument("--relay-bin", default=str(REPO / ".venv" / "bin" / "relay"))
    p.add_argument(
        "--reuse",
        action="store_true",
        help="smtp-source -d: send all of a session's messages over one connection",
    )
    p.add_argument(
        "--postfix-set",
        action="append",
        default=[],
        metavar="PARAM=VALUE",
        help="append a main.cf line, e.g. in_flow_delay=0s (repeatable)",
    )
    p.add_argument(
        "--sink-option",
        action="append",
        default=[],
        metavar="OPT",
        help="extra smtp-sink option, e.g. --sink-option=-p (no PIPELINING)",
    )
    p.add_argument("--timeout", type=float, default=600, help="per phase, seconds (600)")
    p.add_argument("--workdir", help="where queues and configs go (default: a new /tmp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work and dump directories")
    p.add_argument("--json", help="also write the runs as JSON to this file")
    args = p.parse_args(argv)

    if args.cmd == "latency-client":
        res = asyncio.run(
            latency_client(
                args.host, args.port, args.messages, args.sessions, args.size, args.prefix
            )
        )
        json.dump(res, sys.stdout)
        return 0

    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.latency_messages is None:
        args.latency_messages = args.messages
    preflight(args)
    signal.signal(signal.SIGTERM, _interrupt)  # stop Postfix, the relay and the sink on kill
    base = Path(args.workdir or tempfile.mkdtemp(prefix="relay-bench-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)  # Postfix's unprivileged daemons walk into the queue directory
    # Dumps in tmpfs so the sink's own disk writes do not compete with the two queues.
    shm = Path("/dev/shm")
    args.sink_root = (
        Path(tempfile.mkdtemp(prefix="relay-bench-sink-", dir=shm))
        if shm.is_dir() and os.access(shm, os.W_OK)
        else base
    )
    os.chmod(args.sink_root, 0o755)
    log(f"work directory {base}, sink dumps in {args.sink_root}")
    runs: list[Run] = []
    commands: dict[str, list[str]] = {}
    try:
        for rnd in range(1, args.rounds + 1):
            for kind in args.systems:
                log(f"round {rnd}: {kind}, {args.messages} + {args.latency_messages} messages")
                r = one_run(kind, rnd, args, base, commands)
                log(
                    f"round {rnd}: {kind}: intake {fmt(r.intake_rate)} msg/s, end-to-end "
                    f"{fmt(r.e2e_rate)} msg/s, p50 {fmt(r.p50_ms, '.1f')} ms, p99 "
                    f"{fmt(r.p99_ms, '.1f')} ms, exactly once: {r.exactly_once}"
                )
                runs.append(r)
    except KeyboardInterrupt:
        log("interrupted; reporting the runs so far")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
            if args.sink_root != base:
                shutil.rmtree(args.sink_root, ignore_errors=True)
    print(report(runs, args, commands))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=2))
    return 0 if runs and all(r.exactly_once for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
