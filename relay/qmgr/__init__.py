"""The queue manager: what is due, where it goes, what came of it (Postfix's qmgr).

Three small parts with a narrow protocol between them, composed here:

- `scheduler`: one dispatch per `step()` (what is due, in-flight bookkeeping, the parts a
  route's mail is dealt to), the loop that sleeps until the next due time, and stop;
- `results`: what an agent reported → classify → retry schedule → state change → the
  spool, with connector health;
- `bounce`: one NDR per message for its failed recipients.

The delivery agents (`relay.agents`) only deliver; the spool (`relay.spool.protocol.Spool`)
only stores. The queue manager takes the few settings it needs as keyword arguments.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

from relay.agents import DeliveryAgent
from relay.clock import Clock
from relay.policy import Policy
from relay.qmgr.bounce import Bouncer, generated_message
from relay.qmgr.results import Recorder
from relay.qmgr.scheduler import Scheduler, chunks
from relay.routing import RouteKind
from relay.spool.protocol import Spool

__all__ = ["QueueManager", "chunks", "generated_message"]


class QueueManager:
    """Delivers the spool's due mail through `agents` (one per route kind) and writes what
    came of it.

    `retry_schedule` and `message_expiration` are the [queue] settings of those names (the
    latter for the NDRs it queues), `retention` how long finished mail is kept, `hostname`
    the relay's name in the NDRs it writes, `postmaster` their From address.
    """

    def __init__(
        self,
        *,
        spool: Spool,
        clock: Clock,
        policy: Callable[[], Policy],
        agents: Mapping[RouteKind, DeliveryAgent],
        retry_schedule: Sequence[float],
        message_expiration: float,
        retention: float,
        hostname: str,
        postmaster: str,
    ) -> None:
        stopping = asyncio.Event()
        bouncer = Bouncer(
            spool=spool,
            clock=clock,
            policy=policy,
            hostname=hostname,
            postmaster=postmaster,
            message_expiration=message_expiration,
        )
        recorder = Recorder(
            spool=spool,
            clock=clock,
            stopping=stopping,
            ndr_owed=bouncer.owed,
            retry_schedule=retry_schedule,
        )
        self._scheduler = Scheduler(
            spool=spool,
            clock=clock,
            policy=policy,
            agents=agents,
            recorder=recorder,
            bouncer=bouncer,
            stopping=stopping,
            retention=retention,
        )
        spool.on_commit.append(self.wake)
        clock.on_change(self.wake)

    @property
    def agents(self) -> Mapping[RouteKind, DeliveryAgent]:
        """The delivery agent of each route kind."""
        return self._scheduler.agents

    @property
    def in_flight(self) -> int:
        """Recipients being worked on now (dispatched, result not yet written)."""
        return self._scheduler.in_flight

    def wake(self) -> None:
        """Something may have become due (a commit, a CLI change, a clock jump)."""
        self._scheduler.wake()

    async def step(self) -> bool:
        """One dispatch: start delivering what is due now; True when more may be due."""
        return await self._scheduler.step()

    async def settle(self) -> None:
        """Wait for the deliveries started so far (their results written)."""
        await self._scheduler.settle()

    async def run(self) -> None:
        """Deliver until stopped, sleeping until the next due time between steps."""
        await self._scheduler.run()

    async def run_once(self) -> None:
        """Deliver (and bounce) until nothing is due now."""
        await self._scheduler.run_once()

    async def stop(self, grace: float = 5.0) -> None:
        """Start nothing more; what is under way gets `grace` seconds to finish."""
        await self._scheduler.stop(grace)
