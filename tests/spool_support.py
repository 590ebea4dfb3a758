"""The spool backends the spool's own tests run over.

A test that takes the `spool` fixture (tests/conftest.py) runs once per name in BACKENDS,
each time on a new, empty spool: a second backend is one more name here and one more
branch in `opened`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from relay.spool.protocol import Spool
from relay.spool.sqlite import open_spool

BACKENDS = ("sqlite",)


@contextlib.asynccontextmanager
async def opened(backend: str, directory: Path) -> AsyncIterator[Spool]:
    """A new, empty spool of `backend`, closed afterwards."""
    if backend == "sqlite":
        spool: Spool = await open_spool(directory / "relay.db")
    else:
        raise ValueError(f"no spool backend named {backend!r}; the backends are {BACKENDS}")
    try:
        yield spool
    finally:
        await spool.close()
