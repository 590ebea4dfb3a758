"""The scheduler: what is due, and which delivery agent gets it over how many connections.

`step()` is one dispatch: it reads what is due now (never more than `MAX_IN_FLIGHT`
recipients worked on at once, whatever the queue size), gives up on what expired or Fix now
found missing, groups the rest by route and deals each route's messages to at most
`CONNECTIONS_PER_ROUTE` connections (`chunks`); each part is one delivery task, whose
results go to the results step. `run()` is the loop built on it: it sleeps until the next
recipient is due (no polling) and wakes at once when mail is committed, the CLI changes the
queue or the clock jumps; `run_once()` steps until nothing is due now, for tests.

One message never holds up another: an unexpected exception while delivering it defers
that message alone (4.3.0, to its next retry interval). `stop()` starts no new transaction
and lets the ones under way finish and be recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import cast

from relay.agents import (
    CACHE_TIME_LIMIT,
    CONNECTIONS_PER_ROUTE,
    Content,
    DeliveryAgent,
    Parcel,
    Results,
)
from relay.classify import Failure
from relay.clock import Clock
from relay.config import DomainType
from relay.policy import Policy
from relay.qmgr.bounce import Bouncer
from relay.qmgr.results import Batch, Recorder, detail, logged_ids
from relay.retry import is_expired
from relay.routing import Route, RouteKind, route
from relay.spool.protocol import Spool
from relay.spool.rows import RecipientRow

# The queue manager's logger has kept the name it had as relay/worker.py.
log = logging.getLogger("relay.worker")

BATCH = 500  # recipients read per dispatch
COALESCE = 0.02  # seconds: wake-ups within this are handled together
MAX_IN_FLIGHT = 2000  # recipients worked on at once, whatever the queue size
PARCELS_PER_CONNECTION = 50  # messages sent over one connection before another one helps
MAX_SLEEP = 60.0  # re-check at least this often, in case a wake-up was missed
PURGE_EVERY = 600.0
PREFETCH_BYTES = 2_000_000  # a chunk's messages read at once when together no bigger
CANCEL_WAIT = 1.0  # after the grace, what cancelled tasks get to unwind (QUIT, logs)


class _Stopped(Exception):
    """Raised into the agent when it asks for the next message's content after stop():
    it asks right before each transaction, so none starts after the stop."""


class Scheduler:
    """Dispatches due recipients to the delivery agents (`agents`: one per route kind).

    `stopping` is shared with the results step; `retention` is how long finished mail
    stays before the purge.
    """

    def __init__(
        self,
        *,
        spool: Spool,
        clock: Clock,
        policy: Callable[[], Policy],
        agents: Mapping[RouteKind, DeliveryAgent],
        recorder: Recorder,
        bouncer: Bouncer,
        stopping: asyncio.Event,
        retention: float,
    ) -> None:
        missing = set(RouteKind) - set(agents)
        if missing:
            raise ValueError(f"no delivery agent for route kind(s) {sorted(missing)}")
        self._spool = spool
        self._clock = clock
        self._policy = policy
        self._agents = dict(agents)
        self._recorder = recorder
        self._bouncer = bouncer
        self._stopping = stopping
        self._retention = retention
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()
        self._messages_in_flight: Counter[int] = Counter()
        self._tasks: dict[asyncio.Task[None], tuple[int, ...]] = {}  # task: its message ids
        self._limits: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(CONNECTIONS_PER_ROUTE)
        )
        self._last_purge = 0.0

    @property
    def agents(self) -> Mapping[RouteKind, DeliveryAgent]:
        return types.MappingProxyType(self._agents)

    @property
    def in_flight(self) -> int:
        """Recipients being worked on now."""
        return len(self._in_flight)

    def wake(self) -> None:
        self._wake.set()

    # ---- one dispatch -------------------------------------------------------------------

    async def step(self) -> bool:
        """Start the delivery tasks for what is due now; True when more may be due already
        (the batch was full). Returns without waiting for the tasks (`settle`)."""
        room = MAX_IN_FLIGHT - len(self._in_flight)
        if room <= 0 or self._stopping.is_set():
            return False
        now = self._clock.now()
        limit = min(BATCH, room)
        rows = await self._spool.due(now=now, limit=limit, exclude=self._in_flight)
        policy = self._policy()
        expired: list[RecipientRow] = []
        unknown: list[RecipientRow] = []
        groups: dict[str, tuple[Route, list[RecipientRow]]] = {}
        for row in rows:
            # Fix now first: a recipient that does not exist fails as not found, even when
            # the clock has also moved past its expiry.
            if _unknown_in_authoritative(row.address, policy):
                unknown.append(row)
            elif is_expired(now=now, expires_at=row.expires_at):
                expired.append(row)
            else:
                the_route = route(row.address, policy)
                group = groups.get(the_route.key)
                if group is None:
                    groups[the_route.key] = (the_route, [row])
                else:
                    group[1].append(row)
        if expired:
            self._spawn(self._recorder.give_up(expired, Failure.EXPIRED, now=now), expired)
        if unknown:
            self._spawn(self._recorder.give_up(unknown, Failure.NOT_FOUND, now=now), unknown)
        for key, (the_route, members) in groups.items():
            for chunk in chunks(members, PARCELS_PER_CONNECTION):
                self._spawn(self._deliver(key, the_route, chunk), chunk)
        return len(rows) == limit

    async def settle(self) -> None:
        """Wait for the delivery tasks started so far to finish (their results written)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    def _spawn(self, work: Awaitable[None], rows: Sequence[RecipientRow]) -> None:
        ids = [r.id for r in rows]
        messages = Counter(r.message for r in rows)
        self._in_flight.update(ids)
        self._messages_in_flight.update(messages)

        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("a delivery task failed; its recipients stay due")
            finally:
                self._in_flight.difference_update(ids)
                counts = self._messages_in_flight
                for message, n in messages.items():  # not `+= Counter()`: that walks them all
                    left = counts[message] - n
                    if left > 0:
                        counts[message] = left
                    else:
                        counts.pop(message, None)
                self.wake()

        task = asyncio.create_task(run())
        self._tasks[task] = tuple(messages)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    # ---- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping.is_set():
            # Commits arrive in bursts; a few milliseconds gather them into fewer, larger
            # dispatches (more messages per connection, fewer queries per message).
            await asyncio.sleep(COALESCE)
            self._wake.clear()
            try:
                full = await self.step()
                await self._bouncer.step(self._messages_in_flight)
                await self._purge_if_due()
                for agent in self._distinct_agents():
                    await agent.close_idle()
                delay = 0.0 if full else await self._sleep_time()
            except Exception:  # keep the relay alive; the next wake-up tries again
                log.exception("dispatch failed")
                delay = 5.0
            if any(agent.has_idle for agent in self._distinct_agents()):
                delay = min(delay, CACHE_TIME_LIMIT)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    async def run_once(self) -> None:
        """Step until nothing is due now, NDRs included: tests drive the queue manager with
        this, never sleeping."""
        while not self._stopping.is_set():
            await self.step()
            if not self._tasks:
                await self._bouncer.step(self._messages_in_flight)
                if not await self._spool.due(now=self._clock.now(), limit=1):
                    return
                continue
            await self.settle()

    async def stop(self, grace: float) -> None:
        """Dispatch nothing more and start no new transaction; let the transactions under
        way finish and their results be written within `grace`, then cancel what is left.

        Cutting a transaction after its content went would deliver it twice (the
        destination has it, the queue does not know), so only what outlives the grace is
        cut, and that is logged. Recipients not begun stay due for the next start.
        """
        self._stopping.set()
        self.wake()
        tasks = dict(self._tasks)
        if tasks:
            _, late = await asyncio.wait(list(tasks), timeout=grace)
            if late:
                messages = sorted({m for task in late for m in tasks[task]})
                log.error(
                    "stop: %d delivery task(s) still running after the %gs grace are cancelled "
                    "(%s); a transaction cut short may have reached its destination already, "
                    "and these messages will be delivered again after the restart",
                    len(late),
                    grace,
                    logged_ids(messages),
                )
                for task in late:
                    task.cancel()
                await asyncio.wait(late, timeout=CANCEL_WAIT)
        for agent in self._distinct_agents():
            await agent.close_idle(older_than=0)

    def _distinct_agents(self) -> list[DeliveryAgent]:
        """Each agent once (one SMTP agent serves both connector and MX routes)."""
        return list({id(a): a for a in self._agents.values()}.values())

    async def _sleep_time(self) -> float:
        """Until the next recipient falls due. Everything due now was dispatched (or waits
        for room, and a finishing task wakes us), so only later times count."""
        now = self._clock.now()
        next_at = await self._spool.next_due_after(now)
        if next_at is None:
            return MAX_SLEEP
        return min(MAX_SLEEP, max(0.0, next_at - now))

    async def _purge_if_due(self) -> None:
        now = self._clock.now()
        if now - self._last_purge < PURGE_EVERY:
            return
        self._last_purge = now
        removed = await self._spool.purge(before=now - self._retention)
        if removed:
            log.info("purged %d finished message(s) older than the retention", removed)

    # ---- one delivery task --------------------------------------------------------------

    async def _deliver(self, key: str, the_route: Route, rows: list[RecipientRow]) -> None:
        batch = Batch(the_route, {row.id: row for row in rows})
        try:
            parcels, sizes = await self._parcels(rows, batch)
            async with self._limits[key]:
                if self._stopping.is_set():
                    return  # not begun: the recipients stay due for the next start
                await self._through(self._agents[the_route.kind], batch, parcels, sizes)
        except Exception as exc:  # before any parcel: reading the envelopes or the content
            await self._recorder.unexpected(batch, list(batch.unrecorded.values()), exc)
        finally:
            _log_failures(batch)

    async def _through(
        self, agent: DeliveryAgent, batch: Batch, parcels: list[Parcel], sizes: dict[int, int]
    ) -> None:
        content = await self._loader(sizes)
        left = parcels
        while left and not self._stopping.is_set():
            try:
                # Pull one parcel at a time and close the agent's generator on the way out
                # (the SMTP agent QUITs): after a stop no further parcel is asked for.
                stream = cast(
                    AsyncGenerator[tuple[Parcel, Results], None],
                    agent.deliver(batch.route, left, content),
                )
                async with contextlib.aclosing(stream):
                    async for parcel, results in stream:
                        await self._recorder.attempt(batch, parcel.message, results)
                        if self._stopping.is_set():
                            return
                return
            except _Stopped:
                return
            except Exception as exc:
                # An agent delivers in order, so the first parcel without a result is the
                # one it was on. Only that one is deferred; the rest go on a new call (a
                # fresh connection).
                left = [p for p in left if batch.waiting(p)]
                if not left:
                    batch.failures.append((exc, 0))
                    return
                await self._recorder.unexpected(batch, batch.waiting(left[0]), exc)
                left = left[1:]

    async def _loader(self, sizes: dict[int, int]) -> Content:
        """Message content for the agent: small chunks read in one query, big ones one by one
        (memory stays bounded by PREFETCH_BYTES per connection)."""
        prefetched: dict[int, bytes] = {}
        if sum(sizes.values()) <= PREFETCH_BYTES:
            prefetched = await self._spool.contents(list(sizes))

        async def content(message: int) -> bytes:
            if self._stopping.is_set():
                raise _Stopped
            data = prefetched.pop(message, None)
            return data if data is not None else await self._spool.content(message)

        return content

    async def _parcels(
        self, rows: list[RecipientRow], batch: Batch
    ) -> tuple[list[Parcel], dict[int, int]]:
        """One parcel per message, in arrival order (Exchange delivers a queue in order), and
        each message's size; the batch learns their arrival times (the log's delay)."""
        by_message: dict[int, list[RecipientRow]] = defaultdict(list)
        for row in rows:
            by_message[row.message].append(row)
        envelopes = await self._spool.envelopes(list(by_message))
        parcels = [
            Parcel(message, envelopes[message][0], tuple((r.id, r.address) for r in members))
            for message, members in sorted(by_message.items())
            if message in envelopes  # deleted from the CLI meanwhile
        ]
        batch.received = {m: envelope[2] for m, envelope in envelopes.items()}
        return parcels, {p.message: envelopes[p.message][1] for p in parcels}


def chunks(rows: Sequence[RecipientRow], messages: int) -> list[list[RecipientRow]]:
    """Split a route's due recipients into k = ceil(n / `messages`) parts, one per parallel
    connection.

    Message i (in arrival order) goes to part i mod k, so k connections working at the same
    pace hand the destination its mail close to arrival order, not in k runs side by side;
    each part keeps arrival order exactly, and a message's recipients stay together.
    """
    by_message: dict[int, list[RecipientRow]] = {}
    for row in sorted(rows, key=lambda r: (r.message, r.id)):
        by_message.setdefault(row.message, []).append(row)
    groups = list(by_message.values())
    parts = -(-len(groups) // messages)  # ceil; 0 for no rows
    return [[row for group in groups[j::parts] for row in group] for j in range(parts)]


def _log_failures(batch: Batch) -> None:
    """One line per task that met unexpected exceptions, with the first one's traceback."""
    if not batch.failures:
        return
    first = batch.failures[0][0]
    messages = {m for _, m in batch.failures if m}
    log.error(
        "delivery via %s: %d local error(s) (%s); %s deferred to the next retry",
        batch.route.label,
        len(batch.failures),
        detail(first),
        logged_ids(messages) if messages else "nothing",
        exc_info=first,
    )


def _unknown_in_authoritative(address: str, policy: Policy) -> bool:
    return policy.domain_type(address) is DomainType.AUTHORITATIVE and not policy.is_mailbox(
        address
    )
