"""`relay health`: is the SMTP port answering 220 and can the queue be opened?"""

from __future__ import annotations

import asyncio

from relay.config import LoadedConfig
from relay.errors import StoreError
from relay.spool.sqlite import open_spool

# A wildcard listen address is checked through loopback.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


async def check(loaded: LoadedConfig, *, timeout: float) -> str | None:
    """None when healthy, else what is wrong."""
    smtp = loaded.config.smtp
    host = _LOOPBACK.get(smtp.host, smtp.host)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, smtp.port), timeout)
    except (OSError, TimeoutError) as exc:
        return f"cannot connect to {smtp.listen}: {exc}"
    try:
        greeting = await asyncio.wait_for(reader.readline(), timeout)
        if not greeting.startswith(b"220"):
            return f"{smtp.listen} greeted with {greeting.decode(errors='replace').strip()!r}"
        writer.write(b"QUIT\r\n")
        await writer.drain()
    except (OSError, TimeoutError) as exc:
        return f"no greeting from {smtp.listen}: {exc}"
    finally:
        writer.close()
    path = loaded.path(loaded.config.queue.path)
    try:
        spool = await open_spool(path, create=False)
        try:
            await spool.next_due_after(0.0)  # a read of the recipients, from their index
        finally:
            await spool.close()
    except StoreError as exc:
        return str(exc)
    return None
