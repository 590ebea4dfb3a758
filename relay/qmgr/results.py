"""The results step: what came of an attempt, or of giving up, becomes the change to write.

Wire event → `relay.classify` → retry schedule (`relay.retry`) → `relay.states.step` →
`Result`, written through the spool, then one log line per recipient from the same values
(`relay.logs.Line`: the step's status, code and reply, the server, the delay). A write
that fails (a full disk) is tried again with backoff while the recipients stay in flight,
so nothing is sent twice meanwhile. Connector health lives here too: when a connector that
failed delivers again, its deferred mail is made due at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

from relay.agents import Delivered, Parcel, Results
from relay.classify import (
    GIVE_UP_FAILURES,
    LOCAL_FAILURES,
    Failure,
    Outcome,
    Stage,
    WireEvent,
    classify,
    expiry,
    not_found,
)
from relay.clock import Clock
from relay.errors import StoreError
from relay.logs import Line
from relay.retry import next_attempt_at
from relay.routing import Route, RouteKind
from relay.spool.protocol import Spool
from relay.spool.rows import LastError, RecipientRow, Result
from relay.states import Event, step
from relay.text import escaped

# The queue manager's logger has kept the name it had as relay/worker.py: log filters and
# readers of `relay serve`'s output see the same names as before the split.
log = logging.getLogger("relay.worker")

# A result that could not be written (disk full) is tried again after this, doubling up to
# RESULT_RETRY_MAX. Real time, not the relay's clock: a disk is freed in real time.
RESULT_RETRY_FIRST = 0.5
RESULT_RETRY_MAX = 30.0
ERROR_DETAIL = 300  # characters of an unexpected exception's text kept in last_error
IDS_LOGGED = 20  # message ids named in one log line

# The state machine's event for each of the queue manager's verdicts.
_GIVE_UP_EVENTS = {Failure.EXPIRED: Event.EXPIRY, Failure.NOT_FOUND: Event.NOT_FOUND}
assert set(_GIVE_UP_EVENTS) == GIVE_UP_FAILURES


@dataclass(slots=True)
class Batch:
    """One delivery task: its route, its recipients, the ones whose result is not written
    yet, and the unexpected exceptions met on the way (logged once, when the task ends)."""

    route: Route
    rows: dict[int, RecipientRow]
    unrecorded: dict[int, RecipientRow] = field(init=False)
    failures: list[tuple[Exception, int]] = field(default_factory=list)  # (exception, message)
    received: dict[int, float] = field(default_factory=dict)  # message: its received_at

    def __post_init__(self) -> None:
        self.unrecorded = dict(self.rows)

    def waiting(self, parcel: Parcel) -> list[RecipientRow]:
        """The parcel's recipients whose result is not written yet."""
        return [self.unrecorded[rid] for rid, _ in parcel.recipients if rid in self.unrecorded]

    def recorded(self, recipients: Iterable[int]) -> None:
        for rid in recipients:
            self.unrecorded.pop(rid, None)


class Recorder:
    """Decides and writes each recipient's result.

    `stopping` is the queue manager's stop request: it cuts a write's backoff short.
    `ndr_owed` is called whenever a result leaves a sender owed an NDR (the bounce step).
    """

    def __init__(
        self,
        *,
        spool: Spool,
        clock: Clock,
        stopping: asyncio.Event,
        ndr_owed: Callable[[], None],
        retry_schedule: Sequence[float],
    ) -> None:
        self._spool = spool
        self._clock = clock
        self._stopping = stopping
        self._ndr_owed = ndr_owed
        self._retry_schedule = retry_schedule
        self._failing: set[str] = set()  # connectors whose last attempt did not get through

    async def attempt(self, batch: Batch, message: int, results: Results) -> None:
        """Write what the agent reported for one parcel (of `message`) of the batch."""
        route = batch.route
        now = self._clock.now()
        written: list[Result] = []
        lines: list[Line] = []
        delivered = 0
        received = batch.received.get(message)
        delay = None if received is None else now - received
        for rid, event in results.items():
            row = batch.rows[rid]
            if event is None or isinstance(event, Delivered):
                delivered += 1
                result = _result(row, Event.DELIVERED, route.label, now)
                written.append(result)
                lines.append(_delivered_line(row, result, event, delay))
                continue
            outcome = classify(event)
            error = _last_error(outcome, now)
            if outcome.permanent:
                result = _result(row, Event.PERMANENT, route.label, now, error=error)
            else:
                result = self._deferred(row, route.label, error, now)
            written.append(result)
            lines.append(_attempt_line(row, result, event, outcome, delay))
        await self.write(written, (message,))
        batch.recorded(results)
        for line in lines:
            log.info(line)
        if any(w.change.ndr_owed for w in written):
            self._ndr_owed()
        if route.kind is RouteKind.CONNECTOR:
            # A message of our own that could not be sent (an address SMTP cannot carry, a
            # local error) says nothing about the connector either way.
            failed_there = any(
                isinstance(e, WireEvent) and e.failure not in LOCAL_FAILURES
                for e in results.values()
            )
            if delivered or failed_there:
                await self._note_connector(route.label, delivered > 0, now)

    async def unexpected(self, batch: Batch, rows: Sequence[RecipientRow], exc: Exception) -> None:
        """An unexpected exception while delivering these recipients of the batch: they wait
        for their next retry interval (the attempt counts), with the exception as their last
        error. Leaving them due would try them again at once: a hot loop, and being the
        oldest they would lead every chunk of their route."""
        batch.failures.append((exc, rows[0].message if rows else 0))
        if not rows:
            return
        now = self._clock.now()
        event = WireEvent(Stage.MAIL, Failure.INTERNAL, detail(exc))
        outcome = classify(event)
        error = _last_error(outcome, now)
        written = [self._deferred(row, batch.route.label, error, now) for row in rows]
        await self.write(written, sorted({row.message for row in rows}))
        batch.recorded(row.id for row in rows)
        for row, result in zip(rows, written, strict=True):
            received = batch.received.get(row.message)
            delay = None if received is None else now - received
            log.info(_attempt_line(row, result, event, outcome, delay))

    async def give_up(self, rows: Sequence[RecipientRow], failure: Failure, *, now: float) -> None:
        """Expire (Failure.EXPIRED) or fail (Failure.NOT_FOUND, Fix now) recipients without
        an attempt; each keeps its last attempt's server and ip."""
        event = _GIVE_UP_EVENTS[failure]
        written: list[Result] = []
        outcomes: list[Outcome] = []
        for row in rows:
            last = row.last_error
            server, ip = (last.server, last.ip) if last else (None, None)
            if failure is Failure.EXPIRED:
                wire = expiry(last_code=last.code if last else None, server=server, ip=ip)
            else:
                wire = not_found(server=server, ip=ip)
            outcome = classify(wire)
            outcomes.append(outcome)
            error = _last_error(outcome, now)
            written.append(_result(row, event, row.connector, now, error=error))
        messages = sorted({row.message for row in rows})
        await self.write(written, messages)
        self._ndr_owed()
        await self._log_give_up(rows, written, outcomes, messages, now)

    async def _log_give_up(
        self,
        rows: Sequence[RecipientRow],
        written: Sequence[Result],
        outcomes: Sequence[Outcome],
        messages: Sequence[int],
        now: float,
    ) -> None:
        """A line per recipient given up on; the delay needs the messages' arrival times,
        read here (a rare path: expiry, Fix now)."""
        try:
            received = {m: e[2] for m, e in (await self._spool.envelopes(messages)).items()}
        except StoreError:
            received = {}
        for row, result, outcome in zip(rows, written, outcomes, strict=True):
            arrived = received.get(row.message)
            log.info(
                Line(
                    id=row.message,
                    to=row.address,
                    connector=row.connector,
                    delay=None if arrived is None else now - arrived,
                    attempts=row.attempts,
                    code=outcome.code,
                    status=result.change.status.value,
                    reply=outcome.reply,
                )
            )

    def _deferred(self, row: RecipientRow, connector: str, error: LastError, now: float) -> Result:
        """A transient failure: the recipient waits for its next retry interval."""
        retry_at = next_attempt_at(
            attempts=row.attempts + 1,
            now=now,
            schedule=self._retry_schedule,
            expires_at=row.expires_at,
        )
        return _result(row, Event.TRANSIENT, connector, now, error=error, retry_at=retry_at)

    async def write(self, written: list[Result], messages: Collection[int]) -> None:
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
                    await self._spool.record(written)
                except StoreError as exc:
                    failed = exc
                else:
                    if failed is not None:
                        log.info("wrote the results of %s after all", logged_ids(messages))
                    return
                log.warning(
                    "could not write the results of %s (%s); trying again in %gs, "
                    "without sending them again",
                    logged_ids(messages),
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
                    logged_ids(messages),
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
                await self._spool.change(Event.RETRY_NOW, connector=name, now=now)
            except StoreError as exc:  # the next delivery there tries again
                log.warning("could not make %r's deferred mail due now: %s", name, exc)
                return
            self._failing.discard(name)


def logged_ids(messages: Collection[int]) -> str:
    """Message ids for a log line: "id=3,7,9", at most IDS_LOGGED of them."""
    shown = ",".join(str(m) for m in sorted(messages)[:IDS_LOGGED])
    more = len(messages) - IDS_LOGGED
    return f"id={shown}" + (f" and {more} more" if more > 0 else "")


def detail(exc: Exception) -> str:
    """An unexpected exception as last_error's detail: short, and escaped, since its text
    may hold what a hostile envelope brought (CR, invalid UTF-8) and it goes to the spool,
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


def _delivered_line(
    row: RecipientRow, result: Result, delivered: Delivered | None, delay: float | None
) -> Line:
    """`id=7 to=<a@b> connector=... relay=host[ip]:port tls=TLSv1.3 delay=0.2 attempts=1
    status=delivered (250 2.0.0 Ok: queued as 4F2A)`: the destination's reply names its
    own queue id."""
    if delivered is None:
        relay = tls = reply = None
    else:
        relay, tls, reply = (
            (delivered.server, delivered.ip, delivered.port),
            delivered.tls,
            delivered.reply,
        )
    return Line(
        id=row.message,
        to=row.address,
        connector=result.connector,
        relay=relay,
        tls=tls,
        delay=delay,
        attempts=row.attempts + 1,
        status=result.change.status.value,
        reply=reply,
    )


def _attempt_line(
    row: RecipientRow, result: Result, event: WireEvent, outcome: Outcome, delay: float | None
) -> Line:
    """`id=7 to=<a@b> connector=... relay=host[ip]:port delay=3.2 attempts=2 code=4.4.316
    status=deferred next_attempt=... (450 4.4.316 Connection refused [...])`."""
    change = result.change
    return Line(
        id=row.message,
        to=row.address,
        connector=result.connector,
        relay=None if event.server is None else (event.server, event.ip, event.port),
        tls=event.tls,
        delay=delay,
        attempts=row.attempts + 1,
        code=outcome.code,
        status=change.status.value,
        next_attempt=None if change.final else change.next_attempt_at,
        reply=outcome.reply,
    )


def _last_error(outcome: Outcome, now: float) -> LastError:
    return LastError(outcome.code, outcome.reply, outcome.title, outcome.server, outcome.ip, now)
