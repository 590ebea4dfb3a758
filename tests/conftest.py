"""Fixtures shared by the whole suite: configs in tmp_path and in-process relays on port 0.

- `make_config(**overrides) -> Path`: config.example.toml written into tmp_path, listening on
  127.0.0.1:0, queue and mailboxes inside tmp_path, sections changed by `overrides`
  (see tests/helpers.py: `write_config`).
- `start_relay(**overrides) -> Relay` (async): a started in-process relay with a
  ManualClock; or `start_relay(config_path=path)`. The delivery worker does not run unless
  `run_worker=True`: drive it with `await relay.worker.run_once()` so tests see each step.
  Every relay it started stops at teardown.
- `relay_server`: `start_relay()` with the example config; `.port`, `.store`, `.clock`
  (a ManualClock: `relay.clock.advance(seconds)`), `.loaded.source` (its config file, for
  `run_cli(..., config=...)`).
- `tls_files`: a trustme CA and a server certificate in tmp_path (helpers.TlsFiles).
- `spool`: a new, empty spool, once per backend (tests/spool_support.py: BACKENDS).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

# Test modules import `tests.helpers`; that needs the repository root on sys.path whether or
# not tests/ is a package and however pytest was started.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from relay.clock import ManualClock  # noqa: E402
from relay.lab.faults import FaultLab  # noqa: E402
from relay.server import Relay  # noqa: E402
from relay.spool.protocol import Spool  # noqa: E402
from tests.delivery_support import (  # noqa: E402
    ClosedPort,
    closed_port,
    lab_config,
    manual_relay,
    running_lab,
)
from tests.helpers import (  # noqa: E402
    MakeConfig,
    StartRelay,
    TlsFiles,
    load,
    make_tls_files,
    write_config,
)
from tests.spool_support import BACKENDS, opened  # noqa: E402


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    """`make_config(smtp={"max_recipients": 3})` → the path of a config.toml in tmp_path."""

    def make(*, name: str = "config.toml", **overrides: Any) -> Path:
        return write_config(tmp_path, name=name, **overrides)

    return make


@pytest.fixture
async def start_relay(tmp_path: Path) -> AsyncIterator[StartRelay]:
    """Start in-process relays on port 0 with a ManualClock; all are stopped at teardown."""
    started: list[Relay] = []

    async def start(
        *, config_path: Path | None = None, run_worker: bool = False, **overrides: Any
    ) -> Relay:
        if config_path is None:
            # A second relay gets its own directory: one queue serves one relay.
            directory = tmp_path / f"relay-{len(started)}" if started else tmp_path
            config_path = write_config(directory, **overrides)
        relay = Relay(load(config_path), clock=ManualClock())
        try:
            await relay.start(run_worker=run_worker)
        except BaseException:
            await relay.stop()  # a half-started relay holds the store's (non-daemon) thread
            raise
        started.append(relay)
        return relay

    yield start
    for relay in reversed(started):
        await relay.stop()


@pytest.fixture
async def relay_server(start_relay: StartRelay) -> Relay:
    """A running relay with the example config (contoso.test, onprem.contoso.test), no worker."""
    return await start_relay()


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls")


@pytest.fixture(params=BACKENDS)
async def spool(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Spool]:
    """A new, empty spool of each backend in turn: the spool's own tests run over all."""
    async with opened(request.param, tmp_path / "spool") as backend:
        yield backend


# ---- the lab's fault targets, and a relay wired to them (delivery tests) ------------------


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[FaultLab]:
    """Every fault target and the lab DNS server, on loopback ports chosen by the system."""
    async with running_lab(tmp_path / "lab") as started:
        yield started


@pytest.fixture
async def relay(tmp_path: Path, lab: FaultLab) -> AsyncIterator[Relay]:
    """An in-process relay (ManualClock, worker driven by run_once) using the lab."""
    async with manual_relay(lab_config(tmp_path, lab)) as started:
        yield started


@pytest.fixture
def onprem() -> Iterator[ClosedPort]:
    """A loopback port nothing listens on: the on-premises server is "shut down"."""
    with closed_port() as port:
        yield port
