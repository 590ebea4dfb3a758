"""The lab's runtime state kept in the queue database: the clock offset and policy changes.

Small on purpose: the CLI imports it for every queue command, and the server re-reads it
whenever another process commits (see relay.server).
"""

from __future__ import annotations

from relay.config import LoadedConfig
from relay.policy import Policy
from relay.store import Store

CLOCK_OFFSET_KEY = "clock.offset"


async def load_policy(store: Store, loaded: LoadedConfig) -> Policy:
    return Policy.build(loaded.config, await store.settings(""))


async def load_clock_offset(store: Store) -> float:
    value = await store.get_setting(CLOCK_OFFSET_KEY)
    return float(value) if value else 0.0
