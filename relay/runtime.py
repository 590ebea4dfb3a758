"""The lab's runtime state kept in the queue database: the clock offset and policy changes.

Small on purpose: the CLI imports it for every queue command, and the server re-reads it
whenever another process commits (see relay.server). The keys are relay.spool.settings'.
"""

from __future__ import annotations

from relay.config import LoadedConfig
from relay.policy import Policy
from relay.spool.protocol import Spool
from relay.spool.settings import CLOCK_OFFSET


async def load_policy(spool: Spool, loaded: LoadedConfig) -> Policy:
    return Policy.build(loaded.config, await spool.settings())


async def load_clock_offset(spool: Spool) -> float:
    return await spool.get_setting(CLOCK_OFFSET) or 0.0
