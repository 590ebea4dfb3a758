#!/usr/bin/env python3
"""Peak memory of `relay serve` for one message at the size limit (issue 10, item 6).

    .venv/bin/python bench/peak_rss.py

In a new directory under /tmp, on loopback: ``relay --config <dir>/relay.toml serve`` with
``max_message_size`` at its default (35 MB) and one connector to bench/kill9_cycles.py's
counting sink (aiosmtpd in a thread of this process, no size limit of its own).

1. idle: ``--settle`` seconds (2) after the relay greets, VmRSS from /proc/<pid>/status;
2. one message of ``--size`` bytes on the wire (default: 1,000 bytes under the limit; CRLF
   lines of 78 octets) is sent with smtplib and must get 250;
3. VmHWM when the 250 arrives (the intake's share: the worker may already have begun);
4. once the sink has it and the relay's queue has nothing queued or deferred (the result
   is recorded), VmHWM (the process's peak resident set) and VmRSS again.

Prints idle VmRSS, peak VmHWM, (peak - idle) / size (the issue's target: under about 3),
the RSS after delivery, and the exact commands. The exit status is 1 if the message was
not accepted or not delivered within ``--timeout`` seconds. Only the relay's process is
measured (the sink lives in this one).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kill9_cycles import ACKED, CountingSink, RelayServe, message, send_one
from relay_vs_postfix import cmdline, log

LIMIT = 35_000_000  # relay_toml()'s max_message_size, "35MB" (decimal, as Exchange Online)
TARGET_RATIO = 3.0


def mb(kb: int) -> str:
    return f"{kb / 1000:.1f} MB"


def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="relay-rss-"))
    sink = CountingSink(data_size_limit=None)
    relay = RelayServe(workdir, "peak_rss.py", sink.port)
    message_id = "<peak-rss@bench.test>"
    content = message(message_id, size=args.size, subject="at the size limit")
    try:
        relay.start()
        time.sleep(args.settle)
        idle_rss, idle_hwm = relay.status_kb("VmRSS"), relay.status_kb("VmHWM")
        log(f"idle VmRSS {mb(idle_rss)}; sending {len(content)} bytes")
        started = time.monotonic()
        result = send_one(relay.port, content, timeout=args.timeout)
        accepted = time.monotonic() - started
        at_250 = relay.status_kb("VmHWM")
        delivered = result == ACKED and sink.wait(
            lambda s: s.received[message_id] > 0, args.timeout
        )
        recorded = delivered and relay.wait_drained(sink, args.timeout) is not None
        took = time.monotonic() - started
        peak, after = relay.status_kb("VmHWM"), relay.status_kb("VmRSS")
        code, _ = relay.terminate()
    finally:
        if relay.proc is not None:
            relay.kill()
        sink.stop()
    ratio = (peak - idle_rss) * 1000 / len(content)
    lines = [
        "command: " + cmdline([sys.executable, *sys.argv]),
        "relay:   " + cmdline(relay.argv),
        "",
        "| what | value |",
        "|---|---:|",
        f"| message on the wire (limit {LIMIT:,}) | {len(content):,} bytes |",
        f"| idle VmRSS ({args.settle:g}s after the 220) | {mb(idle_rss)} |",
        f"| idle VmHWM (start-up peak) | {mb(idle_hwm)} |",
        f"| VmHWM when the 250 came (intake; delivery may have begun) | {mb(at_250)} |",
        f"| peak VmHWM after accepting and delivering it | {mb(peak)} |",
        f"| (peak - idle) / size | **{ratio:.2f}** (target < {TARGET_RATIO:g}) |",
        f"| VmRSS after delivery | {mb(after)} |",
        f"| reply | {result} in {accepted:.1f}s |",
        f"| at the sink and recorded | {delivered and recorded} ({took:.1f}s after sending) |",
        f"| exit status after SIGTERM | {code} |",
    ]
    print("\n".join(lines))
    if args.keep or not recorded:
        print(f"kept {workdir} (config, relay.log, queue)")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if recorded else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size", type=int, default=LIMIT - 1000, help=f"bytes on the wire ({LIMIT - 1000})"
    )
    p.add_argument("--settle", type=float, default=2.0, help="seconds before the idle sample")
    p.add_argument("--timeout", type=float, default=180, help="seconds per step (180)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if not 1000 <= args.size <= 200_000_000:
        p.error("--size must be 1000..200000000")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
