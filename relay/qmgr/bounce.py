"""The bounce step: one NDR per message for the recipients that failed or expired (the way
Postfix's bounce service works), queued like any mail with the null sender.

A failure is written together with its "NDR owed" flag (relay.states); this step reads the
messages owed one, builds the report (`relay.ndr`, pure) and hands it to the spool, which
queues it and clears the flags in one go.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from relay import codes, headers, ndr
from relay.clock import Clock, to_datetime
from relay.headers import own_received_header
from relay.logs import Line
from relay.policy import Policy
from relay.routing import route
from relay.spool.protocol import Spool
from relay.spool.rows import MessageRow, NewMessage, NewRecipient, RecipientRow

# The queue manager's logger has kept the name it had as relay/worker.py.
log = logging.getLogger("relay.worker")

BOUNCE_BATCH = 200  # messages whose NDRs are built per bounce step
NDR_HISTORY = 5  # the last attempts an NDR quotes


class Bouncer:
    """Sends the NDRs owed. `hostname` is the reporting MTA, `postmaster` the NDR's From."""

    def __init__(
        self,
        *,
        spool: Spool,
        clock: Clock,
        policy: Callable[[], Policy],
        hostname: str,
        postmaster: str,
        message_expiration: float,
    ) -> None:
        self._spool = spool
        self._clock = clock
        self._policy = policy
        self._hostname = hostname
        self._postmaster = postmaster
        self._message_expiration = message_expiration
        self._pending = True  # NDRs owed from before a restart are sent at start

    def owed(self) -> None:
        """A result left some sender owed an NDR: the next step looks."""
        self._pending = True

    async def step(self, in_flight: Mapping[int, int]) -> None:
        """One NDR per message for the recipients that failed, once none of the message's
        recipients is still in flight (`in_flight`: message id → recipients being worked
        on), so recipients failing on several routes in one pass share one NDR."""
        if not self._pending:
            return
        self._pending = False
        owed = await self._spool.bounces_due(limit=BOUNCE_BATCH)
        ready = [m for m in owed if not in_flight.get(m)]
        if len(ready) < len(owed) or len(owed) == BOUNCE_BATCH:
            self._pending = True  # look again once those messages are done
        for message_id in ready:
            message = await self._spool.get_message(message_id, history=True)
            if message is None:
                continue
            failed = [r for r in message.recipients if r.ndr_due]
            bounce = await self._ndr(message, failed) if message.mail_from else None
            await self._spool.send_bounce(message_id, [r.id for r in failed], bounce)
            log.info(
                Line(
                    id=message_id,
                    ndr=None if bounce is None else bounce.id,
                    to=message.mail_from or None,
                    recipients=tuple(r.address for r in failed),
                    # The null sender (an NDR that failed) is owed none: RFC 5321 section 4.5.5.
                    status="ndr-queued" if bounce is not None else "no-ndr",
                )
            )

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
        content = await self._spool.content(message.id)
        headers = content.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        bounce = ndr.Bounce(
            original_headers=headers,
            original_mail_from=message.mail_from,
            arrival_date=to_datetime(message.received_at),
            received_from_mta=message.client_helo or message.client_address or None,
            recipients=tuple(recipients),
        )
        hostname = self._hostname
        body = ndr.build_ndr(
            bounce, reporting_mta=hostname, postmaster=self._postmaster, now=to_datetime(now)
        )
        if body is None:
            return None
        queue_id = self._spool.reserve_id()
        received = own_received_header(hostname=hostname, via="NDR", queue_id=queue_id, now=now)
        sender = message.mail_from
        return generated_message(
            queue_id=queue_id,
            subject=f"Undeliverable: {message.subject}",
            to=[sender],
            content=received + body,
            now=now,
            hostname=hostname,
            message_expiration=self._message_expiration,
            policy=self._policy(),
        )


def generated_message(
    *,
    queue_id: int,
    subject: str,
    to: Sequence[str],
    content: bytes,
    now: float,
    hostname: str,
    message_expiration: float,
    policy: Policy,
) -> NewMessage:
    """A message the relay writes itself (an NDR, an alert): null sender, routed like any,
    `hostname` as its client HELO, expiring `message_expiration` seconds from `now`."""
    return NewMessage(
        id=queue_id,
        message_id=headers.message_id_of(content),
        mail_from="",
        subject=subject,
        received_at=now,
        expires_at=now + message_expiration,
        client_address="",
        client_helo=hostname,
        recipients=[NewRecipient(a, route(a, policy).label) for a in to],
        content=content,
    )
