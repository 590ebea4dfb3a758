#!/usr/bin/env python3
"""SIGTERM under load (issue 10): time from the signal to the exit, and what was sent twice.

    .venv/bin/python bench/shutdown_time.py --rounds 3

Each round, in a new directory under /tmp, on loopback:

1. a slowish destination: bench/kill9_cycles.py's counting sink, which records a message
   when its final dot arrives and answers 250 only ``--sink-delay`` seconds (0.3) later;
2. ``relay --config <dir>/relay.toml serve`` with one connector to it (the relay opens up to
   10 connections to one route, so about 33 messages a second get through);
3. ``--senders`` threads (8) send up to ``--messages`` (1500) 2 KB messages, one per connection,
   ``--rate`` (200) a second together, and keep sending while the relay stops;
4. once ``--queued`` (200) are acknowledged and deliveries are in flight at the sink,
   and ``--settle`` seconds (1) later, so that all the route's connections are busy, SIGTERM; measured: the seconds from the signal until the process has exited, its exit
   status, how many deliveries the sink was holding (dot received, 250 not yet sent) at
   the signal, and how many acknowledged messages were still undelivered;
5. the relay is started again on the same queue and left to drain (at most
   ``--drain-timeout`` seconds), then stopped with SIGTERM; the sink is then asked how many
   messages it got more than once (a delivery the relay did not record before it exited is
   sent again after the restart) and whether any acknowledged message never arrived.

Prints one row per round and the medians, and the exact commands. The exit status is 1 if
an acknowledged message was lost or a round did not drain.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kill9_cycles import ACKED, CountingSink, RelayServe, Senders, tally
from relay_vs_postfix import cmdline, log


@dataclass
class Round:
    number: int
    exit_code: int | None
    stop_s: float
    in_flight: int  # deliveries the sink held at SIGTERM
    acked_at_term: int
    delivered_at_term: int
    acked: int
    duplicated: int
    lost: int
    drained_s: float | None
    restart_exit: int | None
    tracebacks: int


def one_round(args: argparse.Namespace, number: int, commands: list[str]) -> Round:
    workdir = Path(tempfile.mkdtemp(prefix=f"relay-shutdown-{number}-"))
    sink = CountingSink(delay=args.sink_delay)
    relay = RelayServe(workdir, "shutdown_time.py", sink.port)
    senders = Senders(
        relay.port, count=args.senders, prefix=f"st{number}", limit=args.messages, rate=args.rate
    )
    try:
        relay.start()
        commands.append(cmdline(relay.argv))
        senders.start()
        busy = sink.wait(lambda s: s.in_flight > 0, 60) and _wait_acked(senders, args.queued, 60)
        if not busy:
            log(f"round {number}: the load did not build up within 60s; SIGTERM anyway")
        time.sleep(args.settle)  # every connection of the route busy, not just the first
        in_flight, delivered = sink.in_flight, sink.total()
        acked = senders.count(ACKED)
        code, took = relay.terminate(timeout=args.stop_timeout)
        log(f"round {number}: SIGTERM -> exit {code} in {took:.2f}s ({in_flight} in flight)")
        senders.stop()
        relay.start()
        drained = relay.wait_drained(sink, args.drain_timeout)
        restart_exit, _ = relay.terminate(timeout=args.stop_timeout)
    finally:
        senders.stop(5)
        if relay.proc is not None:
            relay.kill()
        sink.stop()
    _, total = tally(senders.sent, sink.received)
    result = Round(
        number=number,
        exit_code=code,
        stop_s=took,
        in_flight=in_flight,
        acked_at_term=acked,
        delivered_at_term=delivered,
        acked=total.acknowledged,
        duplicated=total.duplicated,
        lost=total.lost,
        drained_s=drained,
        restart_exit=restart_exit,
        tracebacks=relay.tracebacks(),
    )
    if args.keep or drained is None or total.lost:
        log(f"round {number}: kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _wait_acked(senders: Senders, target: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if senders.count(ACKED) >= target:
            return True
        time.sleep(0.05)
    return False


def report(args: argparse.Namespace, rounds: list[Round], commands: list[str]) -> str:
    lines = [
        "command: " + cmdline([sys.executable, *sys.argv]),
        *(f"relay:   {c}" for c in commands),
        "",
        "| round | SIGTERM → exit s | exit status | in flight at SIGTERM | acked / delivered "
        "at SIGTERM | acked in all | sent twice | lost | drain after restart s | "
        "exit after drain | 'Traceback' in log |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        drained = f"{r.drained_s:.1f}" if r.drained_s is not None else "NOT DRAINED"
        lines.append(
            f"| {r.number} | {r.stop_s:.2f} | {r.exit_code} | {r.in_flight} | "
            f"{r.acked_at_term} / {r.delivered_at_term} | {r.acked} | {r.duplicated} | "
            f"{r.lost} | {drained} | {r.restart_exit} | {r.tracebacks} |"
        )
    stop = statistics.median(r.stop_s for r in rounds)
    twice = statistics.median(r.duplicated for r in rounds)
    lines += [
        "",
        f"median over {len(rounds)} rounds: SIGTERM → exit {stop:.2f}s, sent twice {twice:g}; "
        f"exit statuses {[r.exit_code for r in rounds]}; lost {sum(r.lost for r in rounds)}",
        f"sink answers {args.sink_delay:g}s after the final dot; {args.senders} senders at "
        f"{args.rate:g} msg/s, "
        f"at most {args.messages} messages per round, SIGTERM {args.settle:g}s after {args.queued} were "
        "acknowledged and deliveries were in flight",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds; the figures are medians (3)")
    p.add_argument(
        "--messages", type=int, default=1500, help="at most this many sent per round (1500)"
    )
    p.add_argument("--queued", type=int, default=200, help="acknowledged before SIGTERM (200)")
    p.add_argument("--senders", type=int, default=8, help="sending threads (8)")
    p.add_argument("--rate", type=float, default=200, help="messages/s, all senders (200)")
    p.add_argument("--sink-delay", type=float, default=0.3, help="seconds before the 250 (0.3)")
    p.add_argument(
        "--settle", type=float, default=1.0, help="seconds from then until SIGTERM (1.0)"
    )
    p.add_argument("--stop-timeout", type=float, default=60, help="SIGKILL after this (60)")
    p.add_argument("--drain-timeout", type=float, default=180, help="seconds (180)")
    p.add_argument("--keep", action="store_true", help="keep every round's directory")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 1 <= args.queued <= args.messages <= 100_000:
        p.error("need 1 <= --rounds <= 20 and 1 <= --queued <= --messages <= 100000")
    commands: list[str] = []
    rounds = [one_round(args, n, commands) for n in range(1, args.rounds + 1)]
    print(report(args, rounds, commands))
    failed = any(r.lost or r.drained_s is None for r in rounds)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
