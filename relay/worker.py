"""The queue manager and its delivery worker: what is due, where it goes, what came of it.

It sleeps until the next recipient is due (no polling), wakes at once when mail is committed,
the CLI changes the queue or the clock jumps, and never holds more than a bounded number of
recipients in memory. Each route is delivered by the agent over reused connections, at most
`CONNECTIONS_PER_ROUTE` at a time. A failure is written together with its "NDR owed" flag;
the bounce step then sends one NDR per message (the way Postfix's bounce service works).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from relay import codes, mailbox, ndr
from relay.classify import Failure, Outcome, Stage, WireEvent, classify
from relay.clock import Clock, to_datetime
from relay.config import Config, DomainType
from relay.delivery import CACHE_TIME_LIMIT, CONNECTIONS_PER_ROUTE, Agent, Parcel, Results
from relay.intake import rfc5322_date
from relay.policy import Policy
from relay.retry import next_attempt_at
from relay.routing import Route, RouteKind, route
from relay.store import (
    LastError,
    MessageRow,
    NewMessage,
    NewRecipient,
    RecipientRow,
    Status,
    Store,
)
from relay.store import Outcome as Result

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

# Fix now (an internal_relay domain made authoritative): queued mail for addresses that do
# not exist there fails at once, as Exchange Online's recipient resolution does.
RECIPIENT_NOT_FOUND = (
    "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
)


@dataclass(frozen=True, slots=True)
class _Item:
    row: RecipientRow
    route: Route


class Worker:
    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        config: Config,
        policy: Callable[[], Policy],
        agent: Agent,
        mailboxes: Path,
    ) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._policy = policy
        self._agent = agent
        self._mailboxes = mailboxes
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()
        self._messages_in_flight: Counter[int] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
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
        while True:
            # Commits arrive in bursts; a few milliseconds gather them into fewer, larger
            # dispatches (more messages per connection, fewer queries per message).
            await asyncio.sleep(COALESCE)
            self._wake.clear()
            try:
                full = await self._dispatch()
                await self._bounce()
                await self._purge_if_due()
                await self._agent.close_idle()
                delay = 0.0 if full else await self._sleep_time()
            except Exception:  # keep the relay alive; the next wake-up tries again
                log.exception("dispatch failed")
                delay = 5.0
            if self._agent.has_idle:
                delay = min(delay, CACHE_TIME_LIMIT)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    async def run_once(self) -> None:
        """Work until nothing is due now: tests drive the worker with this, never sleeping."""
        while True:
            await self._dispatch()
            if not self._tasks:
                await self._bounce()
                if not await self._store.due(now=self._clock.now(), limit=1):
                    return
                continue
            await asyncio.gather(*list(self._tasks))

    async def stop(self, timeout: float = 5.0) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
            for task in pending:  # unrecorded recipients stay due and are tried again
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._agent.close_idle(older_than=0)

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
        if room <= 0:
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
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- delivery -----------------------------------------------------------------------

    async def _deliver(self, key: str, items: list[_Item]) -> None:
        the_route = items[0].route
        rows = {i.row.id: i.row for i in items}
        parcels, sizes = await self._parcels(items)
        async with self._limits[key]:
            if the_route.kind is RouteKind.MAILBOX:
                for parcel in parcels:
                    await self._record(the_route, parcel, await self._to_mailboxes(parcel), rows)
                return
            content = await self._loader(sizes)
            async for parcel, results in self._agent.deliver(the_route, parcels, content):
                await self._record(the_route, parcel, results, rows)

    async def _loader(self, sizes: dict[int, int]) -> Callable[[int], Awaitable[bytes]]:
        """Message content for the agent: small chunks read in one query, big ones one by one
        (memory stays bounded by PREFETCH_BYTES per connection)."""
        prefetched: dict[int, bytes] = {}
        if sum(sizes.values()) <= PREFETCH_BYTES:
            prefetched = await self._store.contents(list(sizes))

        async def content(message: int) -> bytes:
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

    async def _to_mailboxes(self, parcel: Parcel) -> Results:
        content = await self._store.content(parcel.message)
        results: Results = {}
        for rid, address in parcel.recipients:
            try:
                await asyncio.to_thread(
                    mailbox.deliver,
                    self._mailboxes,
                    self._policy().mailbox_for(address),
                    mail_from=parcel.mail_from,
                    content=content,
                )
                results[rid] = None
            except OSError as exc:  # disk full, permissions: try again later
                log.error("mailbox %s: %s", address, exc)
                text = f"4.3.0 Could not write to the mailbox: {exc.strerror or exc}"
                results[rid] = WireEvent(
                    Stage.DATA, Failure.REPLY, text, server="mailbox", code=451, reply=text
                )
        return results

    async def _record(
        self, the_route: Route, parcel: Parcel, results: Results, rows: dict[int, RecipientRow]
    ) -> None:
        now = self._clock.now()
        written: list[Result] = []
        delivered = 0
        for rid, event in results.items():
            row = rows[rid]
            if event is None:
                delivered += 1
                written.append(Result(rid, Status.DELIVERED, now, the_route.label))
                continue
            outcome = classify(event)
            error = _last_error(outcome, now)
            if outcome.permanent:
                written.append(Result(rid, Status.FAILED, now, the_route.label, error=error))
                continue
            next_at = next_attempt_at(
                attempts=row.attempts + 1,
                now=now,
                schedule=self._config.queue.retry_schedule,
                expires_at=row.expires_at,
            )
            written.append(
                Result(
                    rid, Status.DEFERRED, now, the_route.label, next_attempt_at=next_at, error=error
                )
            )
        await self._store.record(written)
        self._bounce_pending |= any(w.status is Status.FAILED for w in written)
        if the_route.kind is RouteKind.CONNECTOR:
            await self._note_connector(the_route.label, delivered > 0, now)
        if delivered:
            log.info(
                "delivered id=%d to %d recipient(s) via %s",
                parcel.message,
                delivered,
                the_route.label,
            )

    async def _note_connector(self, name: str, delivered: bool, now: float) -> None:
        """When a connector comes back, its deferred mail goes now, in arrival order."""
        if not delivered:
            self._failing.add(name)
        elif name in self._failing:
            self._failing.discard(name)
            await self._store.retry_now(connector=name, now=now)

    async def _give_up(self, rows: list[RecipientRow], now: float, *, reply: str | None) -> None:
        """Expire (reply None: the 550 follows the last mail flow code) or fail recipients."""
        written: list[Result] = []
        for row in rows:
            last = row.last_error
            if reply is None:
                line = codes.expired_reply(last.code if last else None)
                status, title = Status.EXPIRED, "Message expired"
            else:
                line, status, title = reply, Status.FAILED, "Recipient not found"
            error = LastError(
                codes.status_of(line),
                line,
                title,
                last.server if last else None,
                last.ip if last else None,
                now,
            )
            written.append(
                Result(row.id, status, now, row.connector, error=error, counts_attempt=False)
            )
        await self._store.record(written)
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
