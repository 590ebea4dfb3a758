#!/usr/bin/env python3
"""Queue scale benchmark for issue 6, section 3: a relay with a huge deferred queue.

    .venv/bin/python bench/queue_scale.py --messages 100000

Everything runs in a new directory under /tmp, on loopback, bounded in count and time:

A. **Scale** (``--messages`` N, default 100,000):

   1. N messages are generated through the spool API (``relay.spool.sqlite.open_spool``:
      ``reserve_id``, concurrent ``enqueue(NewMessage)`` in batches of ``--batch``, which the
      spool's writer group-commits into one transaction per batch; then ``record([Result(QUEUED → DEFERRED,
      next_attempt_at=+20 days, error=LastError(4.4.316 ...))])``). One recipient each,
      ``u<n>@sink.bench.test``, routed to the connector "Bench sink" whose smart host is a
      loopback port that is bound but not listening (connection refused); 2 KB bodies;
      expiry 30 days out, so nothing is due and nothing expires during the run;
   2. ``relay --config X queue list --status deferred --limit 50 --json`` and ``relay
      --config X queue digest --json`` (subprocesses, median of ``--repeat`` runs, each
      output checked), next to ``relay --version`` (the CLI's bare start-up, Python and
      imports: subtract it to get the query's share);
   3. ``relay --config X serve`` on that queue: time from exec until its SMTP port answers
      220; then ``--idle`` seconds (20) with nothing due: CPU% from the utime+stime delta
      of /proc/<pid>/stat over the window, VmRSS and VmHWM from /proc/<pid>/status; stop
      (SIGTERM) and start it again (the restart, timed the same way).

B. **Comes back** (``--comeback`` M, default 10,000): M messages queued (through the
   store) for "Bench sink" while its port is closed; ``relay serve`` tries them, and they
   are deferred with 4.4.316 (real attempts, connection refused). Then a counting SMTP
   sink (this script's ``sink`` sub-command: aiosmtpd in a separate process) starts on
   that port and ``relay queue retry --connector "Bench sink"`` makes them due. Measured:
   every message delivered exactly once (sink side: each ``u<n>`` once; relay side:
   ``queue list --status delivered`` shows M, nothing queued or deferred), the time from
   the retry to the sink's last message and to an empty queue, the most simultaneous
   connections the sink saw (limit: ``CONNECTIONS_PER_ROUTE``, relay/agents/__init__.py), and how far
   the sink's arrival order is from queue order (the relay deals a route's mail to up to 10
   parallel connections in turn, so the global order is close to queue order but not exact;
   each connection's own order is checked separately).

Prints the exact commands and a table of figures with their targets; the exit status is
1 if any target is missed. ``--keep`` keeps the directory (configs, logs, queue, sink
record). Does not need root or Postfix.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay_vs_postfix import RELAY_TOML, cmdline, free_port, log

REPO = Path(__file__).resolve().parent.parent
CONNECTOR = "Bench sink"
SINK_DOMAIN = "sink.bench.test"
SENDER = "bench@source.bench.test"
DAY = 86400.0

# Issue 6, section 3.
TARGET_LIST_S = 1.0
TARGET_DIGEST_S = 1.0
TARGET_READY_S = 5.0
TARGET_IDLE_CPU = 2.0  # percent of one core
TARGET_RSS_MB = 200.0


# --------------------------------------------------------------------------- generation


def rcpt(n: int) -> str:
    return f"u{n}@{SINK_DOMAIN}"


def body(n: int, size: int) -> bytes:
    head = (
        f"From: {SENDER}\r\nTo: {rcpt(n)}\r\nSubject: queue scale {n}\r\n"
        f"Message-ID: <qs-{n}@source.bench.test>\r\nX-Bench-Id: {n}\r\n\r\n"
    ).encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
    fill = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + fill


async def generate(
    db: Path, count: int, *, batch: int, size: int, deferred: bool
) -> dict[str, float]:
    """`count` messages through the spool API; deferred (nothing due) or queued (due now)."""
    from relay.spool.rows import LastError, NewMessage, NewRecipient, Result
    from relay.spool.sqlite import open_spool
    from relay.states import Change, Status

    store = await open_spool(db)
    now = time.time()
    timings: dict[str, float] = {}
    try:
        started = time.monotonic()
        for first in range(0, count, batch):
            messages = []
            for n in range(first, min(count, first + batch)):
                queue_id = store.reserve_id()
                messages.append(
                    NewMessage(
                        id=queue_id,
                        message_id=f"<qs-{n}@source.bench.test>",
                        mail_from=SENDER,
                        subject=f"queue scale {n}",
                        received_at=now,
                        expires_at=now + 30 * DAY,
                        client_address="127.0.0.1",
                        client_helo="source.bench.test",
                        recipients=[NewRecipient(rcpt(n), CONNECTOR)],
                        content=body(n, size),
                    )
                )
            # Concurrent enqueues share the writer's transaction (group commit).
            await asyncio.gather(*(store.enqueue(m) for m in messages))
        timings["enqueue_s"] = time.monotonic() - started
        if deferred:
            started = time.monotonic()
            rows = await store.query(
                "SELECT id FROM recipients WHERE status = ? ORDER BY id", (Status.QUEUED.value,)
            )
            error = LastError(
                "4.4.316",
                "450 4.4.316 Connection refused [Message=Socket error code 10061] "
                "[LastAttemptedServerName=127.0.0.1]",
                "Connection refused",
                "127.0.0.1",
                "127.0.0.1",
                now,
            )
            ids = [int(r[0]) for r in rows]
            for first in range(0, len(ids), 10000):
                await store.record(
                    [
                        Result(
                            rid,
                            Status.QUEUED,
                            Change(Status.DEFERRED, now + 20 * DAY, attempted=True),
                            now,
                            CONNECTOR,
                            error,
                        )
                        for rid in ids[first : first + 10000]
                    ]
                )
            timings["defer_s"] = time.monotonic() - started
    finally:
        await store.close()
    return timings


# --------------------------------------------------------------------------- helpers


class ClosedPort:
    """A loopback port bound but not listening (refused) until release()."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])

    def release(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5) as s:
            s.settimeout(2)
            if s.recv(512).startswith(b"220"):
                with contextlib.suppress(OSError):
                    s.sendall(b"QUIT\r\n")
                return True
    except OSError:
        pass
    return False


def wait_220(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering 220")
        if greets(port):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing answered 220 on 127.0.0.1:{port} within {timeout:.0f}s")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def median_run(argv: list[str], repeat: int, check: Any = None) -> tuple[float, list[float]]:
    """Median wall time of `repeat` runs; `check(stdout)` validates each run's output."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, timeout=120, check=False)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(
                f"{cmdline(argv)} failed ({done.returncode}): {done.stderr[-800:]!r}"
            )
        if check is not None:
            check(done.stdout)
    return statistics.median(times), times


class RelayServe:
    """`relay --config X serve`, stdout/stderr appended to a log file."""

    def __init__(self, relay_bin: str, config: Path, port: int, logfile: Path) -> None:
        self.argv = [relay_bin, "--config", str(config), "serve"]
        self.port = port
        self.logfile = logfile
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> float:
        """Start and wait for 220; returns the seconds from exec to the greeting."""
        with self.logfile.open("ab") as out:
            started = time.monotonic()
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_220(self.port, timeout, self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}; log: {self.log_tail()}") from None
        return time.monotonic() - started

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.logfile.read_text(errors="replace")[-1500:]
        return ""

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM; returns (exit code, seconds to exit)."""
        if self.proc is None:
            return None, 0.0
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                log("relay did not stop within 30s of SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait()
        code, self.proc = self.proc.returncode, None
        return code, time.monotonic() - started


def write_config(workdir: Path, sink_port: int) -> tuple[Path, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "relay.toml"
    config.write_text(
        RELAY_TOML.replace("bench/relay_vs_postfix.py", "bench/queue_scale.py").format(
            port=port, sink=sink_port, dir=workdir
        )
    )
    return config, port


# --------------------------------------------------------------------------- the sink


def run_sink(port: int, out: Path) -> None:
    """A counting SMTP sink (aiosmtpd): one stdout line `mesg=N` per message; on SIGTERM it
    writes {"arrivals": [[connection, rcpt], ...], "max_concurrent", "connections"} to out."""
    import logging

    from aiosmtpd.smtp import SMTP, Envelope, Session

    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command log
    arrivals: list[list[Any]] = []
    state = {"open": 0, "max": 0, "connections": 0}

    class Handler:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            conn = getattr(server, "bench_id", -1)
            for address in envelope.rcpt_tos:
                arrivals.append([conn, address])
            sys.stdout.write(f"mesg={len(arrivals)}\n")
            sys.stdout.flush()
            return "250 2.0.0 Ok: queued"

    class CountingSMTP(SMTP):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            state["connections"] += 1
            state["open"] += 1
            state["max"] = max(state["max"], state["open"])
            self.bench_id = state["connections"]
            super().connection_made(transport)

        def connection_lost(self, error: Exception | None) -> None:
            state["open"] -= 1
            super().connection_lost(error)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        handler = Handler()
        server = await loop.create_server(
            lambda: CountingSMTP(handler, hostname="sink.bench.test", ident="bench sink"),
            "127.0.0.1",
            port,
        )
        await stop.wait()
        server.close()

    asyncio.run(main())
    record = {
        "arrivals": arrivals,
        "max_concurrent": state["max"],
        "connections": state["connections"],
    }
    out.write_text(json.dumps(record))


class Sink:
    """The `sink` sub-command as a subprocess, with a live message counter."""

    def __init__(self, port: int, record: Path) -> None:
        self.port = port
        self.record = record
        self.argv = [sys.executable, __file__, "sink", "--port", str(port), "--out", str(record)]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE)
        self.count = 0
        self.last_at: float | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_220(port, 20, self.proc)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(b"mesg="):
                self.count = int(line[5:])
                self.last_at = time.monotonic()

    def wait_for(self, target: int, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count >= target:
                return self.last_at
            if self.proc.poll() is not None:
                return None
            time.sleep(0.05)
        return None

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if not self.record.exists():
            return {"arrivals": [], "max_concurrent": None, "connections": None}
        return json.loads(self.record.read_text())  # type: ignore[no-any-return]


def order_figures(arrivals: list[list[Any]]) -> dict[str, Any]:
    """How far the sink's arrival order is from queue order (u<n>: n is the queue position)."""
    seq = [int(str(address).split("@")[0][1:]) for _, address in arrivals]
    pairs = len(seq) - 1
    in_order = sum(1 for a, b in itertools.pairwise(seq) if b > a)
    rank = {n: i for i, n in enumerate(sorted(seq))}
    displacement = [abs(i - rank[n]) for i, n in enumerate(seq)]
    by_conn: dict[int, list[int]] = {}
    for (conn, _), n in zip(arrivals, seq, strict=True):
        by_conn.setdefault(int(conn), []).append(n)
    conn_sorted = sum(1 for s in by_conn.values() if all(b > a for a, b in itertools.pairwise(s)))
    return {
        "adjacent_in_order": in_order / pairs if pairs > 0 else 1.0,
        "max_displacement": max(displacement, default=0),
        "mean_displacement": statistics.fmean(displacement) if displacement else 0.0,
        "connections_in_order": conn_sorted,
        "connections_used": len(by_conn),
        "per_connection_ordered": conn_sorted == len(by_conn),
    }


# --------------------------------------------------------------------------- scenarios


@dataclass
class Row:
    what: str
    value: str
    target: str = ""
    ok: bool | None = None

    def cell(self) -> str:
        return "" if self.ok is None else ("yes" if self.ok else "**NO**")


def queue_json(argv: list[str]) -> Any:
    done = subprocess.run(argv, capture_output=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{cmdline(argv)} failed: {done.stderr[-800:]!r}")
    return json.loads(done.stdout or b"[]")


def scenario_scale(
    args: argparse.Namespace, workdir: Path, rows: list[Row], commands: list[str]
) -> None:
    relay = args.relay_bin
    closed = ClosedPort()
    try:
        config, port = write_config(workdir, closed.port)
        db = workdir / "queue" / "relay.db"
        log(f"scale: generating {args.messages} deferred messages through the spool")
        timings = asyncio.run(
            generate(db, args.messages, batch=args.batch, size=args.size, deferred=True)
        )
        rate = args.messages / timings["enqueue_s"]
        rows.append(
            Row(
                f"generate {args.messages} (spool API: enqueue, then record DEFERRED)",
                f"enqueue {timings['enqueue_s']:.1f} s ({rate:.0f} msg/s), "
                f"defer {timings['defer_s']:.1f} s; queue file "
                f"{sum(p.stat().st_size for p in db.parent.glob('relay.db*')) / 2**20:.0f} MB",
            )
        )

        version = [relay, "--version"]
        listing = [
            relay,
            "--config",
            str(config),
            "queue",
            "list",
            "--status",
            "deferred",
            "--limit",
            "50",
            "--json",
        ]
        digest = [relay, "--config", str(config), "queue", "digest", "--json"]
        commands += [cmdline(version), cmdline(listing), cmdline(digest)]

        def check_list(out: bytes) -> None:
            data = json.loads(out)
            if len(data) != 50:
                raise RuntimeError(f"queue list returned {len(data)} messages, not 50")

        def check_digest(out: bytes) -> None:
            data = json.loads(out)
            if len(data) != 1 or data[0].get("messages") != args.messages:
                raise RuntimeError(f"queue digest: {data!r}, not one row of {args.messages}")

        log("scale: timing the CLI")
        start_up, _ = median_run(version, args.repeat)
        list_s, list_all = median_run(listing, args.repeat, check_list)
        digest_s, digest_all = median_run(digest, args.repeat, check_digest)
        rows.append(Row("CLI start-up: `relay --version`", f"{start_up:.2f} s"))
        rows.append(
            Row(
                "`queue list --status deferred --limit 50 --json`",
                f"{list_s:.2f} s (query ≈ {list_s - start_up:.2f} s; runs "
                + ", ".join(f"{t:.2f}" for t in list_all)
                + ")",
                f"< {TARGET_LIST_S:g} s",
                list_s < TARGET_LIST_S,
            )
        )
        rows.append(
            Row(
                "`queue digest --json` (1 row, messages = N)",
                f"{digest_s:.2f} s (query ≈ {digest_s - start_up:.2f} s; runs "
                + ", ".join(f"{t:.2f}" for t in digest_all)
                + ")",
                f"< {TARGET_DIGEST_S:g} s",
                digest_s < TARGET_DIGEST_S,
            )
        )

        server = RelayServe(relay, config, port, workdir / "relay.log")
        commands.append(cmdline(server.argv))
        log("scale: starting relay serve on the queue")
        ready = server.start()
        pid = server.pid
        cpu_at_ready = proc_cpu_s(pid)
        time.sleep(1.0)
        log(f"scale: ready in {ready:.2f} s; idle for {args.idle:g} s")
        cpu0, t0 = proc_cpu_s(pid), time.monotonic()
        rss_samples = []
        while time.monotonic() - t0 < args.idle:
            time.sleep(min(1.0, args.idle - (time.monotonic() - t0)) or 0.01)
            rss_samples.append(proc_status_kb(pid, "VmRSS"))
        cpu1, t1 = proc_cpu_s(pid), time.monotonic()
        idle_cpu = 100 * (cpu1 - cpu0) / (t1 - t0)
        rss_kb = proc_status_kb(pid, "VmRSS")
        hwm_kb = proc_status_kb(pid, "VmHWM")
        code, stop_s = server.stop()
        restart = server.start()
        restart_code, _ = server.stop()
        rows.append(
            Row(
                "`relay serve` on the queue: exec → 220 (first start; restart)",
                f"{ready:.2f} s; {restart:.2f} s (CPU until ready {cpu_at_ready:.2f} s)",
                f"< {TARGET_READY_S:g} s",
                max(ready, restart) < TARGET_READY_S,
            )
        )
        rows.append(
            Row(
                f"idle CPU over {t1 - t0:.0f} s, nothing due (utime+stime / wall)",
                f"{idle_cpu:.2f} % of one core ({cpu1 - cpu0:.2f} s CPU)",
                f"< {TARGET_IDLE_CPU:g} %",
                idle_cpu < TARGET_IDLE_CPU,
            )
        )
        rows.append(
            Row(
                "RSS: VmRSS at the end of the idle window / VmHWM (peak)",
                f"{rss_kb / 1024:.0f} MB / {hwm_kb / 1024:.0f} MB (VmRSS range "
                f"{min(rss_samples) / 1024:.0f}-{max(rss_samples) / 1024:.0f} MB)",
                f"< {TARGET_RSS_MB:g} MB",
                hwm_kb / 1024 < TARGET_RSS_MB,
            )
        )
        clean = code == 0 and restart_code == 0 and "Traceback" not in server.log_tail()
        rows.append(
            Row(
                "SIGTERM: exit status (both runs), no traceback in the log",
                f"{code}, {restart_code} in {stop_s:.2f} s",
                "0",
                clean,
            )
        )
    finally:
        closed.release()


def scenario_comeback(
    args: argparse.Namespace, workdir: Path, rows: list[Row], commands: list[str]
) -> None:
    from relay.agents import CONNECTIONS_PER_ROUTE  # the queue manager's limit per route

    relay, m = args.relay_bin, args.comeback
    closed = ClosedPort()
    server: RelayServe | None = None
    sink: Sink | None = None
    try:
        config, port = write_config(workdir, closed.port)
        db = workdir / "queue" / "relay.db"
        log(f"comeback: queueing {m} messages for {CONNECTOR!r} (port {closed.port} closed)")
        asyncio.run(generate(db, m, batch=args.batch, size=args.size, deferred=False))
        digest = [relay, "--config", str(config), "queue", "digest", "--json"]
        server = RelayServe(relay, config, port, workdir / "relay.log")
        server.start()
        started = time.monotonic()
        deferred = 0
        while time.monotonic() - started < args.timeout:
            data = queue_json(digest)
            deferred = sum(r.get("recipients", 0) for r in data if r.get("code") == "4.4.316")
            if deferred >= m:
                break
            time.sleep(1)
        defer_s = time.monotonic() - started
        if deferred < m:
            raise RuntimeError(f"only {deferred} of {m} deferred with 4.4.316 in {defer_s:.0f}s")
        rows.append(
            Row(
                f"comeback: {m} queued, tried against the closed port, deferred 4.4.316",
                f"{defer_s:.1f} s (polled with `queue digest --json`)",
            )
        )
        closed.release()
        sink = Sink(closed.port, workdir / "sink.json")
        commands.append(cmdline(sink.argv))
        retry = [
            relay,
            "--config",
            str(config),
            "queue",
            "retry",
            "--connector",
            CONNECTOR,
            "--json",
        ]
        commands.append(cmdline(retry))
        log(f"comeback: sink up on {closed.port}; {cmdline(retry)}")
        t0 = time.monotonic()
        made_due = queue_json(retry).get("recipients")
        last = sink.wait_for(m, args.timeout)
        sink_s = (last - t0) if last is not None else None
        # The relay writes each result after the sink's 250: wait for an empty queue too.
        empty_s = None
        pending = [
            [
                relay,
                "--config",
                str(config),
                "queue",
                "list",
                "--status",
                s,
                "--limit",
                "1",
                "--json",
            ]
            for s in ("queued", "deferred")
        ]
        while time.monotonic() - t0 < args.timeout:
            if not any(queue_json(p) for p in pending):
                empty_s = time.monotonic() - t0
                break
            time.sleep(0.5)
        delivered_list = [
            relay,
            "--config",
            str(config),
            "queue",
            "list",
            "--status",
            "delivered",
            "--json",
        ]
        commands.append(cmdline(delivered_list))
        listed = queue_json(delivered_list)
        relay_delivered = sum(
            1 for msg in listed for r in msg.get("recipients", []) if r.get("status") == "delivered"
        )
        time.sleep(1.5)  # anything late (a duplicate) would arrive now
        record = sink.stop()
        sink = None
        code, _ = server.stop()
        server = None

        arrivals = record["arrivals"]
        seen = Counter(str(a) for _, a in arrivals)
        expected = {rcpt(n) for n in range(m)}
        missing = len(expected - seen.keys())
        dupes = sum(1 for c in seen.values() if c > 1)
        extra = len(seen.keys() - expected)
        order = order_figures(arrivals)
        once = not missing and not dupes and not extra and relay_delivered == m
        rows.append(
            Row(
                "comeback: `queue retry --connector` made due",
                f"{made_due} recipients",
                f"= {m}",
                made_due == m,
            )
        )
        rows.append(
            Row(
                "comeback: delivered exactly once (sink: each u<n> once; relay: queue list "
                "--status delivered)",
                f"sink {len(arrivals)} (missing {missing}, twice {dupes}, unexpected {extra}); "
                f"relay {relay_delivered} delivered",
                f"{m}, exactly once",
                once,
            )
        )
        rows.append(
            Row(
                "comeback: retry → sink has all; → queue empty",
                f"{sink_s:.1f} s ({m / sink_s:.0f} msg/s); {empty_s:.1f} s"
                if sink_s and empty_s
                else f"timed out ({args.timeout:g} s)",
                f"< {args.timeout:g} s",
                bool(sink_s and empty_s),
            )
        )
        rows.append(
            Row(
                "comeback: simultaneous connections at the sink (max; sessions that carried mail)",
                f"{record['max_concurrent']}; {order['connections_used']} (the relay reuses "
                "cached connections across batches)",
                f"<= {CONNECTIONS_PER_ROUTE} (CONNECTIONS_PER_ROUTE)",
                record["max_concurrent"] is not None
                and record["max_concurrent"] <= CONNECTIONS_PER_ROUTE,
            )
        )
        rows.append(
            Row(
                "comeback: arrival order vs queue order (global)",
                f"{100 * order['adjacent_in_order']:.1f} % of adjacent pairs in order; "
                f"max displacement {order['max_displacement']}, mean "
                f"{order['mean_displacement']:.1f} positions",
                "reported (parallel connections interleave)",
            )
        )
        rows.append(
            Row(
                "comeback: order within each connection",
                f"{order['connections_in_order']} of {order['connections_used']} sessions "
                "delivered in queue order",
                "all",
                order["per_connection_ordered"],
            )
        )
        rows.append(Row("comeback: relay exit status after SIGTERM", f"{code}", "0", code == 0))
    finally:
        closed.release()
        if sink is not None:
            sink.stop()
        if server is not None:
            server.stop()


# --------------------------------------------------------------------------- main


def report(rows: list[Row], commands: list[str], args: argparse.Namespace) -> str:
    lines = ["## Commands", "", f"    {cmdline([sys.executable, *sys.argv])}"]
    lines += [f"    {c}" for c in commands]
    lines += [
        "",
        f"## Figures ({args.messages} deferred messages; comeback {args.comeback}; "
        f"{args.size}-byte bodies)",
        "",
        "| what | measured | target | met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.what} | {r.value} | {r.target} | {r.cell()} |" for r in rows]
    missed = [r.what for r in rows if r.ok is False]
    lines += ["", "All targets met." if not missed else f"Missed: {'; '.join(missed)}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd")
    sk = sub.add_parser("sink", help="the counting SMTP sink on its own")
    sk.add_argument("--port", type=int, required=True)
    sk.add_argument("--out", type=Path, required=True)
    p.add_argument("--messages", type=int, default=100000, help="deferred queue size (100000)")
    p.add_argument("--comeback", type=int, default=10000, help="comeback messages (10000; 0 skips)")
    p.add_argument("--batch", type=int, default=5000, help="concurrent enqueues per commit (5000)")
    p.add_argument("--size", type=int, default=2048, help="message size in bytes (2048)")
    p.add_argument("--repeat", type=int, default=5, help="CLI runs per timing, median (5)")
    p.add_argument("--idle", type=float, default=20.0, help="idle window, seconds (20)")
    p.add_argument("--timeout", type=float, default=600, help="per wait, seconds (600)")
    p.add_argument("--relay-bin", default=str(REPO / ".venv" / "bin" / "relay"))
    p.add_argument("--workdir", help="where the queues go (default: a new /tmp directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", help="also write the figures as JSON to this file")
    args = p.parse_args(argv)
    if args.cmd == "sink":
        run_sink(args.port, args.out)
        return 0
    if not (shutil.which(args.relay_bin) or Path(args.relay_bin).exists()):
        sys.exit(f"relay executable {args.relay_bin!r} not found (make test creates .venv)")

    base = Path(args.workdir or tempfile.mkdtemp(prefix="relay-queue-scale-"))
    base.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    commands: list[str] = []
    failed = False
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if args.messages:
            scenario_scale(args, base / "scale", rows, commands)
        if args.comeback:
            scenario_comeback(args, base / "comeback", rows, commands)
    except (RuntimeError, KeyboardInterrupt) as exc:
        failed = True
        rows.append(Row("run", f"aborted: {exc}", "completes", False))
    print(report(rows, commands, args))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    if args.keep or failed:
        log(f"kept {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failed or any(r.ok is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
