"""The queue manager and its delivery worker: what is due, where it goes, what came of it.

It sleeps until the next recipient is due (no polling), wakes at once when mail is committed,
the CLI changes the queue or the clock jumps, and never holds more than a bounded number of
recipients in memory. Each route is delivered by the agent over reused connections, at most
`CONNECTIONS_PER_ROUTE` at a time. A failure is written together with its "NDR owed" flag;
the bounce step then sends one NDR per message (the way Postfix's bounce service works).

One message never holds up another: an unexpected exception while delivering it defers that
message alone (4.3.0, to its next retry interval), and a result that cannot be written is
written again later while its recipients stay in flight, never sent again meanwhile.
`stop()` starts no new transaction and lets the ones under way finish and be recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from relay import codes, ndr
from relay.agents import CACHE_TIME_LIMIT, CONNECTIONS_PER_ROUTE, DeliveryAgent, Parcel, Results
from relay.classify import LOCAL_FAILURES, Failure, Outcome, Stage, WireEvent, classify
from relay.clock import Clock, to_datetime
from relay.config import Config, DomainType
from relay.errors import StoreError
from relay.headers import rfc5322_date
from relay.policy import Policy
from relay.retry import next_attempt_at
from relay.routing import Route, RouteKind, route
from relay.spool.protocol import Spool
from relay.spool.rows import LastError, MessageRow, NewMessage, NewRecipient, RecipientRow, Result
from relay.states import Event, step
from relay.text import escaped

log = logging.getLogger("relay.worker")

BATCH = 500  # recipients read per dispatch
BOUNCE_BATCH = 200  # messages whose NDRs are built per bounce step
COALESCE = 0.02  # seconds: wake-ups within this are handled together
MAX_IN_FLIGHT = 2000  # recipients worked on at once, whatever the queue size
PARCELS_PER_CONNECTION = 50  # messages sent over one connection before another one helps
MAX_SLEEP = 60.0  # re-check at least this often, in case a wake-up was missed
PURGE_EVERY = 600.0
NDR_HISTORY = 5  # the last attempts an NDR quotes
PREFETCH_BYTES = 2_000_000  # a chunk's messages read at once when together no bigger
# A result that could not be written (disk full) is tried again after this, doubling up to
# RESULT_RETRY_MAX. Real time, not the relay's clock: a disk is freed in real time.
RESULT_RETRY_FIRST = 0.5
RESULT_RETRY_MAX = 30.0
CANCEL_WAIT = 1.0  # after the grace, what cancelled tasks get to unwind (QUIT, logs)
ERROR_DETAIL = 300  # characters of an unexpected exception's text kept in last_error
IDS_LOGGED = 20  # message ids named in one log line

# Fix now (an internal_relay domain made authoritative): queued mail for addresses that do
# not exist there fails at once, as Exchange Online's recipient resolution does.
RECIPIENT_NOT_FOUND = (
    "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
)


@dataclass(frozen=True, slots=True)
class _Item:
    row: RecipientRow
    route: Route


@dataclass(slots=True)
class _Work:
    """One delivery task: its route, its recipients, the ones whose result is not written
    yet, and the unexpected exceptions met on the way (logged once, when the task ends)."""

    route: Route
    rows: dict[int, RecipientRow]
    unrecorded: dict[int, RecipientRow] = field(init=False)
    failures: list[tuple[Exception, int]] = field(default_factory=list)  # (exception, message)

    def __post_init__(self) -> None:
        self.unrecorded = dict(self.rows)

    def waiting(self, parcel: Parcel) -> list[RecipientRow]:
        """The parcel's recipients whose result is not written yet."""
        return [self.unrecorded[rid] for rid, _ in parcel.recipients if rid in self.unrecorded]

    def recorded(self, recipients: Iterable[int]) -> None:
        for rid in recipients:
            self.unrecorded.pop(rid, None)


class _Stopped(Exception):
    """Raised into the agent when it asks for the next message's content after stop():
    it asks right before each transaction, so none starts after the stop."""


class Worker:
    def __init__(
        self,
        *,
        store: Spool,
        clock: Clock,
        config: Config,
        policy: Callable[[], Policy],
        agents: dict[RouteKind, DeliveryAgent],
    ) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._policy = policy
        self._agents = agents
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._in_flight: set[int] = set()
        self._messages_in_flight: Counter[int] = Counter()
        self._tasks: dict[asyncio.Task[None], tuple[int, ...]] = {}  # task: its message ids
        self._limits: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(CONNECTIONS_PER_ROUTE)
        )
        self._failing: set[str] = set()  # connectors whose last attempt did not get through
        self._last_purge = 0.0
        self._bounce_pending = True  # NDRs owed from before a restart are sent at start
        store.on_commit.append(self.wake)
        clock.on_change(self.wake)

    def wake(self) -> None:
        self._wake.set()

    # ---- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping.is_set():
            # Commits arrive in bursts; a few milliseconds gather them into fewer, larger
            # dispatches (more messages per connection, fewer queries per message).
            await asyncio.sleep(COALESCE)
            self._wake.clear()
            try:
                full = await self._dispatch()
                await self._bounce()
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
        """Work until nothing is due now: tests drive the worker with this, never sleeping."""
        while not self._stopping.is_set():
            await self._dispatch()
            if not self._tasks:
                await self._bounce()
                if not await self._store.due(now=self._clock.now(), limit=1):
                    return
                continue
            await asyncio.wait(list(self._tasks))

    async def stop(self, timeout: float = 5.0) -> None:
        """Dispatch nothing more and start no new transaction; let the transactions under
        way finish and their results be written within `timeout`, then cancel what is left.

        Cutting a transaction after its content went would deliver it twice (the
        destination has it, the queue does not know), so only what outlives the grace is
        cut, and that is logged. Recipients not begun stay due for the next start.
        """
        self._stopping.set()
        self.wake()
        tasks = dict(self._tasks)
        if tasks:
            _, late = await asyncio.wait(list(tasks), timeout=timeout)
            if late:
                messages = sorted({m for task in late for m in tasks[task]})
                log.error(
                    "stop: %d delivery task(s) still running after the %gs grace are cancelled "
                    "(%s); a transaction cut short may have reached its destination already, "
                    "and these messages will be delivered again after the restart",
                    len(late),
                    timeout,
                    _ids(messages),
                )
                for task in late:
                    task.cancel()
                await asyncio.wait(late, timeout=CANCEL_WAIT)
        for agent in self._distinct_agents():
            await agent.close_idle(older_than=0)

    def _distinct_agents(self) -> list[DeliveryAgent]:
        return list({id(a): a for a in self._agents.values()}.values())

    async def _sleep_time(self) -> float:
        """Until the next recipient falls due. Everything due now was dispatched (or waits
        for room, and a finishing task wakes us), so only later times count."""
        now = self._clock.now()
        next_at = await self._store.next_due_after(now)
        if next_at is None:
            return MAX_SLEEP
        return min(MAX_SLEEP, max(0.0, next_at - now))

    async def _dispatch(self) -> bool:
        """Start work on what is due; True when there may be more due right now."""
        room = MAX_IN_FLIGHT - len(self._in_flight)
        if room <= 0 or self._stopping.is_set():
            return False
        now = self._clock.now()
        limit = min(BATCH, room)
        rows = await self._store.due(now=now, limit=limit, exclude=self._in_flight)
        policy = self._policy()
        expired: list[RecipientRow] = []
        unknown: list[RecipientRow] = []
        groups: dict[str, list[_Item]] = defaultdict(list)
        for row in rows:
            # Fix now first: a recipient that does not exist fails as not found, even when
            # the clock has also moved past its expiry.
            if _unknown_in_authoritative(row.address, policy):
                unknown.append(row)
            elif now >= row.expires_at:
                expired.append(row)
            else:
                item = _Item(row, route(row.address, policy))
                groups[item.route.key].append(item)
        if expired:
            self._spawn(self._give_up(expired, now, reply=None), expired)
        if unknown:
            self._spawn(self._give_up(unknown, now, reply=RECIPIENT_NOT_FOUND), unknown)
        for key, items in groups.items():
            for chunk in _chunks(items, PARCELS_PER_CONNECTION):
                self._spawn(self._deliver(key, chunk), [i.row for i in chunk])
        return len(rows) == limit

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

    # ---- delivery -----------------------------------------------------------------------

    async def _deliver(self, key: str, items: list[_Item]) -> None:
        work = _Work(items[0].route, {i.row.id: i.row for i in items})
        try:
            parcels, sizes = await self._parcels(items)
            async with self._limits[key]:
                if self._stopping.is_set():
                    return  # not begun: the recipients stay due for the next start
                await self._through(self._agents[work.route.kind], work, parcels, sizes)
        except Exception as exc:  # before any parcel: reading the envelopes or the content
            await self._defer(work, list(work.unrecorded.values()), exc, Stage.MAIL)
        finally:
            _log_failures(work)

    async def _through(
        self, agent: DeliveryAgent, work: _Work, parcels: list[Parcel], sizes: dict[int, int]
    ) -> None:
        content = await self._loader(sizes)
        left = parcels
        while left and not self._stopping.is_set():
            try:
                # Pull one parcel at a time and close the agent's generator on the way out
                # (it QUITs): after a stop no further parcel is asked for.
                stream = cast(
                    AsyncGenerator[tuple[Parcel, Results], None],
                    agent.deliver(work.route, left, content),
                )
                async with contextlib.aclosing(stream):
                    async for parcel, results in stream:
                        await self._record(work, parcel, results)
                        if self._stopping.is_set():
                            return
                return
            except _Stopped:
                return
            except Exception as exc:
                # The agent sends in order, so the first parcel without a result is the one
                # it was on. Only that one is deferred; the rest go on a fresh connection.
                left = [p for p in left if work.waiting(p)]
                if not left:
                    work.failures.append((exc, 0))
                    return
                await self._defer(work, work.waiting(left[0]), exc, Stage.MAIL)
                left = left[1:]

    async def _loader(self, sizes: dict[int, int]) -> Callable[[int], Awaitable[bytes]]:
        """Message content for the agent: small chunks read in one query, big ones one by one
        (memory stays bounded by PREFETCH_BYTES per connection)."""
        prefetched: dict[int, bytes] = {}
        if sum(sizes.values()) <= PREFETCH_BYTES:
            prefetched = await self._store.contents(list(sizes))

        async def content(message: int) -> bytes:
            if self._stopping.is_set():
                raise _Stopped
            data = prefetched.pop(message, None)
            return data if data is not None else await self._store.content(message)

        return content

    async def _parcels(self, items: list[_Item]) -> tuple[list[Parcel], dict[int, int]]:
        """One parcel per message, in arrival order (Exchange delivers a queue in order), and
        each message's size."""
        by_message: dict[int, list[RecipientRow]] = defaultdict(list)
        for item in items:
            by_message[item.row.message].append(item.row)
        envelopes = await self._store.envelopes(list(by_message))
        parcels = [
            Parcel(message, envelopes[message][0], tuple((r.id, r.address) for r in rows))
            for message, rows in sorted(by_message.items())
            if message in envelopes  # deleted from the CLI meanwhile
        ]
        return parcels, {p.message: envelopes[p.message][1] for p in parcels}

    async def _record(self, work: _Work, parcel: Parcel, results: Results) -> None:
        the_route = work.route
        now = self._clock.now()
        written: list[Result] = []
        delivered = 0
        for rid, event in results.items():
            row = work.rows[rid]
            if event is None:
                delivered += 1
                written.append(_result(row, Event.DELIVERED, the_route.label, now))
                continue
            outcome = classify(event)
            error = _last_error(outcome, now)
            if outcome.permanent:
                written.append(_result(row, Event.PERMANENT, the_route.label, now, error=error))
            else:
                written.append(self._deferred(row, the_route.label, error, now))
        await self._write(written, (parcel.message,))
        work.recorded(results)
        self._bounce_pending |= any(w.change.ndr_owed for w in written)
        if the_route.kind is RouteKind.CONNECTOR:
            # A message of our own that could not be sent (an address SMTP cannot carry, a
            # local error) says nothing about the connector either way.
            failed_there = any(
                e is not None and e.failure not in LOCAL_FAILURES for e in results.values()
            )
            if delivered or failed_there:
                await self._note_connector(the_route.label, delivered > 0, now)
        if delivered:
            log.info(
                "delivered id=%d to %d recipient(s) via %s",
                parcel.message,
                delivered,
                the_route.label,
            )

    def _deferred(self, row: RecipientRow, connector: str, error: LastError, now: float) -> Result:
        """A transient failure: the recipient waits for its next retry interval."""
        retry_at = next_attempt_at(
            attempts=row.attempts + 1,
            now=now,
            schedule=self._config.queue.retry_schedule,
            expires_at=row.expires_at,
        )
        return _result(row, Event.TRANSIENT, connector, now, error=error, retry_at=retry_at)

    async def _defer(
        self, work: _Work, rows: Sequence[RecipientRow], exc: Exception, stage: Stage
    ) -> None:
        """An unexpected exception while delivering these recipients: they wait for their
        next retry interval (the attempt counts), with the exception as their last error.
        Leaving them due would try them again at once: a hot loop, and being the oldest they
        would lead every chunk of their route."""
        work.failures.append((exc, rows[0].message if rows else 0))
        if not rows:
            return
        now = self._clock.now()
        error = _last_error(classify(WireEvent(stage, Failure.INTERNAL, _detail(exc))), now)
        written = [self._deferred(row, work.route.label, error, now) for row in rows]
        await self._write(written, sorted({row.message for row in rows}))
        work.recorded(row.id for row in rows)

    async def _write(self, written: list[Result], messages: Collection[int]) -> None:
        """Write results, trying again with backoff while that fails (a full disk).

        The recipients stay in flight meanwhile, so `due()` does not hand them out again:
        giving up here would send the message again at once (the issue saw 300 deliveries
        in 8 s). A stop cuts the wait short; the writes go on within its grace.
        """
        delay = RESULT_RETRY_FIRST
        failed: StoreError | None = None
        try:
            while True:
                try:
                    await self._store.record(written)
                except StoreError as exc:
                    failed = exc
                else:
                    if failed is not None:
                        log.info("wrote the results of %s after all", _ids(messages))
                    return
                log.warning(
                    "could not write the results of %s (%s); trying again in %gs, "
                    "without sending them again",
                    _ids(messages),
                    failed,
                    delay,
                )
                await self._pause(delay)
                delay = min(2 * delay, RESULT_RETRY_MAX)
        except asyncio.CancelledError:
            if failed is not None:
                log.error(
                    "stopped before the results of %s could be written (%s): after the "
                    "restart they are tried again, and one delivered already arrives twice",
                    _ids(messages),
                    failed,
                )
            raise

    async def _pause(self, delay: float) -> None:
        """Wait before writing again; a stop request ends the wait, and within the grace
        the writes are tried every RESULT_RETRY_FIRST."""
        if self._stopping.is_set():
            await asyncio.sleep(min(delay, RESULT_RETRY_FIRST))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    async def _note_connector(self, name: str, delivered: bool, now: float) -> None:
        """When a connector comes back, its deferred mail goes now, in arrival order."""
        if not delivered:
            self._failing.add(name)
        elif name in self._failing:
            try:
                await self._store.change(Event.RETRY_NOW, connector=name, now=now)
            except StoreError as exc:  # the next delivery there tries again
                log.warning("could not make %r's deferred mail due now: %s", name, exc)
                return
            self._failing.discard(name)

    async def _give_up(self, rows: list[RecipientRow], now: float, *, reply: str | None) -> None:
        """Expire (reply None: the 550 follows the last mail flow code) or fail recipients."""
        written: list[Result] = []
        for row in rows:
            last = row.last_error
            if reply is None:
                line = codes.expired_reply(last.code if last else None)
                event, title = Event.EXPIRY, "Message expired"
            else:
                line, event, title = reply, Event.NOT_FOUND, "Recipient not found"
            error = LastError(
                codes.status_of(line),
                line,
                title,
                last.server if last else None,
                last.ip if last else None,
                now,
            )
            written.append(_result(row, event, row.connector, now, error=error))
        await self._write(written, sorted({row.message for row in rows}))
        self._bounce_pending = True

    # ---- bounces ------------------------------------------------------------------------

    async def _bounce(self) -> None:
        """One NDR per message for the recipients that failed, once none is still in flight
        (so recipients failing on several routes in one pass share one NDR)."""
        if not self._bounce_pending:
            return
        self._bounce_pending = False
        owed = await self._store.bounces_due(limit=BOUNCE_BATCH)
        ready = [m for m in owed if not self._messages_in_flight[m]]
        if len(ready) < len(owed) or len(owed) == BOUNCE_BATCH:
            self._bounce_pending = True  # look again once those messages are done
        for message_id in ready:
            message = await self._store.get_message(message_id, history=True)
            if message is None:
                continue
            failed = [r for r in message.recipients if r.ndr_due]
            bounce = await self._ndr(message, failed) if message.mail_from else None
            await self._store.send_bounce(message_id, [r.id for r in failed], bounce)

    async def _ndr(self, message: MessageRow, failed: list[RecipientRow]) -> NewMessage | None:
        """The NDR for these recipients of a message (None for the null sender)."""
        now = self._clock.now()
        recipients = []
        for row in failed:
            error = row.last_error
            line = codes.final_line(error.reply) if error else codes.QUEUE_EXPIRED_REPLY
            # The give-up line itself (an expiry, Fix now) is the verdict, not an attempt.
            history = [(to_datetime(a.at), a.reply) for a in row.history if a.reply != line]
            recipients.append(
                ndr.FailedRecipient(
                    row.address,
                    line,
                    error.server if error else None,
                    tuple(history[-NDR_HISTORY:]),
                )
            )
        content = await self._store.content(message.id)
        headers = content.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        bounce = ndr.Bounce(
            original_headers=headers,
            original_mail_from=message.mail_from,
            arrival_date=to_datetime(message.received_at),
            received_from_mta=message.client_helo or message.client_address or None,
            recipients=tuple(recipients),
        )
        hostname = self._config.smtp.hostname
        postmaster = f"postmaster@{self._config.default_domain}"
        body = ndr.build_ndr(
            bounce, reporting_mta=hostname, postmaster=postmaster, now=to_datetime(now)
        )
        if body is None:
            return None
        queue_id = self._store.reserve_id()
        received = (
            f"Received: from localhost by {hostname} (NDR) id {queue_id}; {rfc5322_date(now)}\r\n"
        ).encode()
        sender = message.mail_from
        log.info("NDR for id=%d to <%s> (%d recipient(s))", message.id, sender, len(recipients))
        return generated_message(
            queue_id=queue_id,
            subject=f"Undeliverable: {message.subject}",
            to=[sender],
            content=received + body,
            now=now,
            config=self._config,
            policy=self._policy(),
        )

    async def _purge_if_due(self) -> None:
        now = self._clock.now()
        if now - self._last_purge < PURGE_EVERY:
            return
        self._last_purge = now
        removed = await self._store.purge(before=now - self._config.queue.retention)
        if removed:
            log.info("purged %d finished message(s) older than the retention", removed)


def _ids(messages: Collection[int]) -> str:
    """Message ids for a log line: "id=3,7,9", at most IDS_LOGGED of them."""
    shown = ",".join(str(m) for m in sorted(messages)[:IDS_LOGGED])
    more = len(messages) - IDS_LOGGED
    return f"id={shown}" + (f" and {more} more" if more > 0 else "")


def _log_failures(work: _Work) -> None:
    """One line per task that met unexpected exceptions, with the first one's traceback."""
    if not work.failures:
        return
    first = work.failures[0][0]
    messages = {m for _, m in work.failures if m}
    log.error(
        "delivery via %s: %d local error(s) (%s); %s deferred to the next retry",
        work.route.label,
        len(work.failures),
        _detail(first),
        _ids(messages) if messages else "nothing",
        exc_info=first,
    )


def _detail(exc: Exception) -> str:
    """An unexpected exception as last_error's detail: short, and escaped, since its text
    may hold what a hostile envelope brought (CR, invalid UTF-8) and it goes to the store,
    the log and the NDR."""
    return escaped(f"{type(exc).__name__}: {exc}"[:ERROR_DETAIL])


def _result(
    row: RecipientRow,
    event: Event,
    connector: str,
    now: float,
    *,
    error: LastError | None = None,
    retry_at: float | None = None,
) -> Result:
    """What `event` makes of a recipient handed out as due (so queued or deferred: the
    state machine always has a change for it), ready to be written."""
    change = step(row.state, event, now, retry_at=retry_at)
    assert change is not None, f"{event} changes nothing for a {row.status} recipient"
    return Result(row.id, row.status, change, now, connector, error)


def _last_error(outcome: Outcome, now: float) -> LastError:
    return LastError(outcome.code, outcome.reply, outcome.title, outcome.server, outcome.ip, now)


def _unknown_in_authoritative(address: str, policy: Policy) -> bool:
    return policy.domain_type(address) is DomainType.AUTHORITATIVE and not policy.is_mailbox(
        address
    )


def _chunks(items: list[_Item], messages: int) -> list[list[_Item]]:
    """Split a route's work into k = ceil(n / `messages`) parts for parallel connections.

    Message i (in arrival order) goes to part i mod k, so k connections working at the same
    pace hand the destination its mail close to arrival order, not in k runs side by side;
    each part keeps arrival order exactly, and a message's recipients stay together.
    """
    by_message: dict[int, list[_Item]] = {}
    for item in sorted(items, key=lambda i: (i.row.message, i.row.id)):
        by_message.setdefault(item.row.message, []).append(item)
    groups = list(by_message.values())
    parts = -(-len(groups) // messages)  # ceil; 0 for no items
    return [[item for group in groups[j::parts] for item in group] for j in range(parts)]


def generated_message(
    *,
    queue_id: int,
    subject: str,
    to: Sequence[str],
    content: bytes,
    now: float,
    config: Config,
    policy: Policy,
) -> NewMessage:
    """A message the relay writes itself (an NDR, an alert): null sender, routed like any."""
    return NewMessage(
        id=queue_id,
        message_id=message_id_of(content),
        mail_from="",
        subject=subject,
        received_at=now,
        expires_at=now + config.queue.message_expiration,
        client_address="",
        client_helo=config.smtp.hostname,
        recipients=[NewRecipient(a, route(a, policy).label) for a in to],
        content=content,
    )


def message_id_of(content: bytes) -> str:
    """The Message-ID header of a message we built ("" when it has none)."""
    for line in content.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode("ascii", "replace")
    return ""
