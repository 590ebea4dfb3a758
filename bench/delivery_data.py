#!/usr/bin/env python3
"""The delivery agent's DATA phase on its own: hot-path time for small messages, peak RSS
for a big one (issue 10, item 6).

    .venv/bin/python bench/delivery_data.py hot --messages 3000 --rounds 5
    .venv/bin/python bench/delivery_data.py rss --size 35000000

Both drive `relay.agents.smtp.SmtpAgent` directly (no intake, no store) against Postfix's
`smtp-sink` in its own process on a free loopback port, so the sink's memory and CPU never
count. `hot` sends N 2 KB messages over one connection per round and prints wall time and
this process's CPU time per message (CPU is steadier than wall time on a shared machine).
`rss` builds one message, resets the kernel's peak-RSS mark (writing 5 to
/proc/self/clear_refs, Linux 4.0+), sends it, and prints VmHWM above the RSS just before
sending: what delivery itself costs in memory, the message's own copy excluded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from relay.agents import Parcel
from relay.agents.smtp import SmtpAgent
from relay.config import Connector, TlsPolicy
from relay.resolve import Resolver
from relay.routing import Route, RouteKind


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def sink() -> Iterator[int]:
    """smtp-sink on a free port (in its own process); yields the port."""
    port = free_port()
    argv = ["smtp-sink", f"127.0.0.1:{port}", "64"]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", "postfix"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"smtp-sink did not start: {argv}") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait()


def route_to(port: int) -> Route:
    connector = Connector(
        name="Bench sink",
        type="partner",
        recipient_domains=["sink.bench.test"],
        smart_hosts=[f"127.0.0.1:{port}"],
        tls=TlsPolicy.NONE,
    )
    return Route(RouteKind.CONNECTOR, "sink.bench.test", connector)


def message(size: int) -> bytes:
    """Headers, then base64 lines of 76 characters (CRLF) up to about `size` bytes."""
    head = b"From: bench@source.bench.test\r\nTo: bench@sink.bench.test\r\nSubject: bench\r\n\r\n"
    body = base64.encodebytes(os.urandom(max(0, size - len(head)) * 3 // 4 + 3))
    return head + body.replace(b"\n", b"\r\n")[: max(0, size - len(head))] + b"\r\n"


async def deliver(agent: SmtpAgent, route: Route, parcels: list[Parcel], content: bytes) -> int:
    async def load(_: int) -> bytes:
        return content

    delivered = 0
    async for _, results in agent.deliver(route, parcels, load):
        delivered += sum(1 for event in results.values() if event is None)
    return delivered


def agent() -> SmtpAgent:
    return SmtpAgent(resolver=Resolver(nameservers=[], timeout=2), hostname="relay.bench.test")


async def hot(messages: int, rounds: int, size: int) -> None:
    content = message(size)
    parcels = [
        Parcel(n, "bench@source.bench.test", ((n, f"{n}@sink.bench.test"),))
        for n in range(messages)
    ]
    walls: list[float] = []
    cpus: list[float] = []
    with sink() as port:
        route = route_to(port)
        await deliver(agent(), route, parcels[:50], content)  # warm up imports and caches
        for _ in range(rounds):
            the_agent = agent()
            wall, cpu = time.perf_counter(), time.process_time()
            delivered = await deliver(the_agent, route, parcels, content)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            await the_agent.close_idle(older_than=0)
            assert delivered == messages, delivered
    per = [1e6 * c / messages for c in cpus]
    print(
        f"hot: {messages} x {len(content)} B over one connection, {rounds} rounds: "
        f"wall median {statistics.median(walls):.3f}s "
        f"({messages / statistics.median(walls):.0f} msg/s), "
        f"CPU median {statistics.median(per):.1f} us/msg (min {min(per):.1f}, max {max(per):.1f})"
    )


def vm(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """VmHWM := VmRSS (Linux 4.0+, proc(5) clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


async def rss(size: int) -> None:
    content = message(size)
    parcels = [Parcel(1, "bench@source.bench.test", ((1, "big@sink.bench.test"),))]
    with sink() as port:
        route = route_to(port)
        the_agent = agent()
        await deliver(
            the_agent,
            route,
            [Parcel(0, "bench@source.bench.test", ((0, "warm@sink.bench.test"),))],
            b"warm up\r\n",
        )
        gc.collect()
        reset_peak()
        before = vm("VmRSS")
        delivered = await deliver(the_agent, route, parcels, content)
        peak = vm("VmHWM")
        await the_agent.close_idle(older_than=0)
    assert delivered == 1
    mib = 1024
    print(
        f"rss: one {len(content) / 1e6:.1f} MB message: RSS before sending {before / mib:.1f} MiB "
        f"(message included), peak while sending {peak / mib:.1f} MiB, "
        f"delta {peak - before} KiB = {(peak - before) * 1024 / len(content):.3f}x the message"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    h = sub.add_parser("hot", help="small messages: time per message")
    h.add_argument("--messages", type=int, default=3000)
    h.add_argument("--rounds", type=int, default=5)
    h.add_argument("--size", type=int, default=2048)
    r = sub.add_parser("rss", help="one big message: peak RSS above the RSS before sending")
    r.add_argument("--size", type=int, default=35_000_000)
    args = parser.parse_args()
    if shutil.which("smtp-sink") is None:
        raise SystemExit("needs Postfix's smtp-sink (Debian package postfix)")
    if args.what == "hot":
        asyncio.run(hot(args.messages, args.rounds, args.size))
    else:
        asyncio.run(rss(args.size))


if __name__ == "__main__":
    main()
