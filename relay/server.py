"""The running relay: the spool, the SMTP front end and the queue manager wired together.

`Relay` is what tests start in-process; `serve` adds signal handling for `relay serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sqlite3
import ssl
import time
from pathlib import Path
from typing import IO

from relay import alerts, errors
from relay.agents import DeliveryAgent
from relay.agents.maildir import MaildirAgent
from relay.agents.smtp import SmtpAgent
from relay.clock import Clock
from relay.config import LoadedConfig
from relay.errors import StoreError
from relay.intake import IntakeHandler, IntakeServer, SessionLimits, start_intake, tls_context
from relay.policy import Policy
from relay.qmgr import QueueManager, generated_message
from relay.resolve import Resolver
from relay.routing import RouteKind
from relay.runtime import load_clock_offset, load_policy
from relay.spool.protocol import Spool
from relay.spool.settings import ALERT_NOTIFIED
from relay.spool.sqlite import open_spool

log = logging.getLogger("relay.server")

WATCH_INTERVAL = 1.0  # the CLI's changes reach a running server within about a second
ALERT_INTERVAL = 2.0
# On stop, what is under way (a session in DATA, a delivery's transaction and the writing of
# its result) gets this long to finish; only what is still running then is cut.
SHUTDOWN_GRACE = 5.0


class StartupError(errors.RelayError):
    """The relay cannot start; the message says what to change."""


class AlreadyRunning(StartupError, BlockingIOError):
    """Another relay holds the queue's lock: what flock(LOCK_NB) raised, BlockingIOError."""


class Relay:
    """One relay instance: start() binds and begins work, stop() finishes cleanly."""

    def __init__(self, loaded: LoadedConfig, *, clock: Clock | None = None) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.clock = clock or Clock()
        self.store: Spool | None = None
        self.policy = Policy.build(self.config)
        self._server: IntakeServer | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._lock: IO[bytes] | None = None
        self.worker: QueueManager | None = None  # the queue manager
        self._worker_task: asyncio.Task[None] | None = None
        self._alerter: asyncio.Task[None] | None = None
        self._changes = 0  # commits seen, ours and other processes'
        self._alert_deadline: float | None = None
        self._stopped = False

    @property
    def db_path(self) -> Path:
        return self.loaded.path(self.config.queue.path)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.port

    def _take_lock(self) -> None:
        """One server per queue: two writers would hand out the same message ids."""
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(str(self.db_path) + ".lock", "wb")  # noqa: SIM115 - held for the lifetime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise AlreadyRunning(
                f"another relay is already serving {self.db_path}; stop it first"
            ) from None
        lock.write(str(os.getpid()).encode())
        lock.flush()
        self._lock = lock

    async def start(self, *, run_worker: bool = True) -> None:
        """Bind and begin. run_worker=False leaves delivery to explicit `worker.run_once()`."""
        self._take_lock()
        self.store = store = await open_spool(self.db_path)
        store.on_commit.append(self._changed)
        self.clock.offset = await load_clock_offset(store)
        self.policy = await load_policy(store, self.loaded)
        smtp = self.config.smtp
        tls = None
        if smtp.tls_certificate:
            try:
                tls = tls_context(smtp.tls_certificate, smtp.tls_key)
            except (ssl.SSLError, OSError) as exc:
                raise StartupError(
                    f"smtp.tls_certificate = {smtp.tls_certificate!r} / smtp.tls_key = "
                    f"{smtp.tls_key!r}: cannot load them ({exc}); give a PEM certificate "
                    "chain and its private key"
                ) from None
        handler = IntakeHandler(
            store=store,
            clock=self.clock,
            policy=lambda: self.policy,
            hostname=smtp.hostname,
            max_recipients=smtp.max_recipients,
            message_expiration=self.config.queue.message_expiration,
            require_tls=smtp.require_tls,
        )
        self._server = await start_intake(
            handler=handler,
            host=smtp.host,
            port=smtp.port,
            hostname=smtp.hostname,
            max_message_size=smtp.max_message_size,
            tls=tls,
            require_tls=smtp.require_tls,
            limits=SessionLimits(
                idle_timeout=smtp.idle_timeout,
                max_connections=smtp.max_connections,
                max_connections_per_client=smtp.max_connections_per_client,
            ),
        )
        queue = self.config.queue
        self.worker = QueueManager(
            spool=store,
            clock=self.clock,
            policy=lambda: self.policy,
            agents=self._agents(),
            retry_schedule=queue.retry_schedule,
            message_expiration=queue.message_expiration,
            retention=queue.retention,
            hostname=smtp.hostname,
            postmaster=f"postmaster@{self.config.default_domain}",
        )
        if run_worker:
            self._worker_task = asyncio.create_task(self.worker.run())
        self._watcher = asyncio.create_task(self._watch())
        self._alerter = asyncio.create_task(self._alert_loop())
        log.info("listening on %s, queue %s", smtp.listen, self.db_path)

    def _agents(self) -> dict[RouteKind, DeliveryAgent]:
        """The delivery agent of each route kind: Maildir for local mailboxes, SMTP (one
        agent, one connection cache) for connectors and MX."""
        dns = self.config.dns
        smtp = SmtpAgent(
            resolver=Resolver(nameservers=dns.nameservers, timeout=dns.timeout),
            hostname=self.config.smtp.hostname,
        )
        maildir = MaildirAgent(
            root=self.loaded.path(self.config.mailboxes.path),
            mailbox_for=lambda address: self.policy.mailbox_for(address),
        )
        return {RouteKind.MAILBOX: maildir, RouteKind.CONNECTOR: smtp, RouteKind.MX: smtp}

    async def _watch(self) -> None:
        """Pick up the CLI's commits (clock, runtime policy, queue actions)."""
        assert self.store is not None
        version = await self.store.data_version()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                current = await self.store.data_version()
                if current != version:
                    version = current
                    await self.refresh()
            except (StoreError, sqlite3.Error) as exc:  # keep serving; the next tick tries again
                log.warning("could not read the queue's changes: %s", exc)

    async def refresh(self) -> None:
        assert self.store is not None
        self._changed()
        self.policy = await load_policy(self.store, self.loaded)
        self.clock.offset = await load_clock_offset(self.store)
        if self.worker is not None:
            self.worker.wake()  # a retry, hold or expiry request may make something due

    async def _alert_loop(self) -> None:
        interval = ALERT_INTERVAL
        seen = -1
        while True:
            await asyncio.sleep(interval)
            deadline = self._alert_deadline
            # The check reads the whole pending queue: run it only when the queue changed or
            # an alert's `after` has just passed, and less often the longer it takes, so an
            # idle relay with a huge queue stays under 2% of a core.
            if seen == self._changes and (deadline is None or self.clock.now() < deadline):
                continue
            seen = self._changes
            started = time.monotonic()
            try:
                await self.check_alerts()
            except (StoreError, sqlite3.Error) as exc:
                log.warning("could not check the alerts: %s", exc)
            interval = max(ALERT_INTERVAL, 50 * (time.monotonic() - started))

    def _changed(self) -> None:
        self._changes += 1

    async def check_alerts(self) -> int:
        """Send "Messages have been delayed" once per episode; returns how many were sent."""
        assert self.store is not None
        store, now = self.store, self.clock.now()
        notified = await store.settings(ALERT_NOTIFIED)
        current = alerts.alerts(await store.digest(), self.policy, notified)
        for connector in ALERT_NOTIFIED.names(notified) - {a.connector for a in current}:
            await store.set_setting(ALERT_NOTIFIED(connector), None)  # the episode is over
        settings = self.config.alerts
        due = alerts.due_notifications(current, settings, now) if settings.notify else []
        self._alert_deadline = alerts.next_deadline(current, settings, exclude=due)
        for alert in due:
            content = alerts.build_notification(
                alert,
                to=settings.notify,
                postmaster=f"postmaster@{self.config.default_domain}",
                hostname=self.config.smtp.hostname,
                now=now,
            )
            await store.enqueue(
                generated_message(
                    queue_id=store.reserve_id(),
                    subject=f"Messages have been delayed: {alert.connector}",
                    to=settings.notify,
                    content=content,
                    now=now,
                    hostname=self.config.smtp.hostname,
                    message_expiration=self.config.queue.message_expiration,
                    policy=self.policy,
                )
            )
            await store.set_setting(ALERT_NOTIFIED(alert.connector), now)
            log.warning(
                "alert: %s %s on %r, notified %s",
                alert.code,
                alert.title,
                alert.connector,
                ", ".join(settings.notify),
            )
        return len(due)

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting and starting work, let what is under way finish within `grace`,
        then close the queue. A second call does nothing.

        The intake stops listening first; then it and the queue manager wind down side by side,
        so the whole stop takes one grace, not two: sessions in DATA finish while the
        deliveries start no new transaction and finish the ones under way, with their
        results written. The store closes last, once nothing is left to write.
        """
        if self._stopped:
            return
        self._stopped = True
        for task in (self._watcher, self._alerter, self._worker_task):
            if task is not None:  # the queue manager's loop: nothing more is dispatched
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # gather starts its tasks in this order: the listening socket is closed first.
        await asyncio.gather(self._close_intake(grace), self._stop_worker(grace))
        if self.store is not None:
            await self.store.close()
        if self._lock is not None:
            self._lock.close()

    async def _close_intake(self, grace: float) -> None:
        if self._server is not None:
            await self._server.close(grace=grace)

    async def _stop_worker(self, grace: float) -> None:
        if self.worker is not None:
            await self.worker.stop(grace)


async def serve(loaded: LoadedConfig) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly."""
    relay = Relay(loaded)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await relay.start()
    except BaseException:
        await relay.stop()  # close the store, or its thread keeps the process alive
        raise
    print(
        f"relay: listening on {loaded.config.smtp.listen} as {loaded.config.smtp.hostname}; "
        f"queue {relay.db_path}; config {loaded.source}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        started = time.monotonic()
        await relay.stop()
        log.info("stopped in %.2fs", time.monotonic() - started)
