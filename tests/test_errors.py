"""The relay's exceptions: one root (relay.errors.RelayError), each also the built-in it
resembles, all drawn on relay.errors' first page, and caught once by the CLI."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re

import pytest

import relay
import relay.cli
from relay import errors
from relay.config import LoadedConfig
from relay.errors import (
    ConfigError,
    DnsTimeout,
    FaultUnavailable,
    LabOptionError,
    RelayError,
    UnitError,
    UsageError,
)
from relay.server import AlreadyRunning, StartupError
from relay.units import parse_duration, parse_size
from tests.helpers import MakeConfig, run_main

# Private classes are control flow inside one module and never leave it.
NOT_YET_RELAY_ERRORS: set[str] = set()


def _relay_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for module in pkgutil.walk_packages(relay.__path__, "relay."):
        if module.name == "relay.__main__":
            continue
        for name, value in vars(importlib.import_module(module.name)).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.name
                and not name.startswith("_")
            ):
                found[f"{module.name}.{name}"] = value
    return found


def test_every_relay_exception_derives_from_the_root() -> None:
    outside = {name for name, cls in _relay_exceptions().items() if not issubclass(cls, RelayError)}
    assert outside == NOT_YET_RELAY_ERRORS


def test_the_hierarchy_on_the_first_page_names_every_error() -> None:
    assert errors.__doc__ is not None
    for name, cls in _relay_exceptions().items():
        if issubclass(cls, RelayError):
            drawn = re.search(rf"(?m)^[ │├└─]*{cls.__name__} ", errors.__doc__)
            assert drawn, f"{name} is missing from the tree in relay.errors"


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (UnitError, ValueError),
        (LabOptionError, ValueError),
        (FaultUnavailable, RuntimeError),
        (DnsTimeout, TimeoutError),
        (AlreadyRunning, BlockingIOError),
        (AlreadyRunning, StartupError),
    ],
)
def test_an_error_is_also_the_builtin_it_resembles(
    error: type[RelayError], builtin: type[BaseException]
) -> None:
    assert issubclass(error, RelayError) and issubclass(error, builtin)


def test_built_in_lookalikes_keep_their_message() -> None:
    assert str(AlreadyRunning("another relay is already serving x")) == (
        "another relay is already serving x"
    )
    assert str(DnsTimeout(None, "a.test", "the A query for a.test timed out")) == (  # type: ignore[arg-type]
        "the A query for a.test timed out"
    )


def test_unit_errors_are_value_errors_with_the_fix() -> None:
    with pytest.raises(UnitError, match="like '15m'"):
        parse_duration("48x")
    with pytest.raises(ValueError, match="like '35MB'"):
        parse_size("lots")


# ---- the CLI catches the root once ------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code", "stderr"),
    [
        (
            RelayError("the queue is gone; run relay serve"),
            1,
            "relay: the queue is gone; run relay serve\n",
        ),
        (UsageError("clock advance: no"), 2, "relay: clock advance: no\n"),
        (
            ConfigError("c.toml", ["smtp.listen: bad", "queue.path: empty"]),
            2,
            "relay: c.toml: smtp.listen: bad\nrelay: c.toml: queue.path: empty\n",
        ),
        (
            LabOptionError("--base-port 0: choose another"),
            1,
            "relay: --base-port 0: choose another\n",
        ),
        (
            AlreadyRunning("another relay is already serving q.db"),
            1,
            "relay: another relay is already serving q.db\n",
        ),
    ],
)
def test_the_cli_prints_any_relay_error_as_lines_and_exits(
    monkeypatch: pytest.MonkeyPatch,
    make_config: MakeConfig,
    error: RelayError,
    code: int,
    stderr: str,
) -> None:
    def failing(args: argparse.Namespace, loaded: LoadedConfig) -> int:
        raise error

    monkeypatch.setattr(relay.cli, "cmd_config_check", failing)
    result = run_main("config", "check", config=make_config())
    assert (result.code, result.stdout, result.stderr) == (code, "", stderr)
