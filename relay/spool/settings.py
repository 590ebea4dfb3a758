"""Runtime settings: the lab's changes the spool keeps (clock offset, domain types, connectors
enabled, alerts notified), each under a typed key.

A key knows the text it is stored under and how its value becomes text and back, so callers
read and write values (a float, a `DomainType`, a bool), never strings. The stored texts are
those of every earlier release: a queue database keeps its settings across an upgrade.

Pure: `Policy.build` and `alerts.alerts` read a snapshot (`Spool.settings()`, the stored
text by key) with these keys; the spool reads and writes one key with `get_setting` and
`set_setting`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from relay.config import DomainType

T = TypeVar("T")

Stored = Mapping[str, str]  # the stored text of settings, by key


@dataclass(frozen=True, slots=True)
class Key(Generic[T]):
    """One setting: the text it is stored under and how its value is written as text."""

    text: str
    decode: Callable[[str], T | None]  # None: the stored text means "not set"
    encode: Callable[[T], str]

    def read(self, stored: Stored) -> T | None:
        """Its value in a snapshot; None when it is not set."""
        raw = stored.get(self.text)
        return None if raw is None else self.decode(raw)


@dataclass(frozen=True, slots=True)
class Family(Generic[T]):
    """Keys that differ by a name (a domain, a connector): stored as prefix + name."""

    prefix: str
    decode: Callable[[str], T | None]
    encode: Callable[[T], str]

    def __call__(self, name: str) -> Key[T]:
        return Key(self.prefix + name, self.decode, self.encode)

    def names(self, stored: Stored) -> set[str]:
        """The names this family has a setting for in a snapshot."""
        return {key[len(self.prefix) :] for key in stored if key.startswith(self.prefix)}


def _offset(text: str) -> float:
    return float(text) if text else 0.0


def _stamp(text: str) -> float | None:
    return float(text) if text else None


def _enabled(text: str) -> bool:
    return text == "true"  # anything else stored is "disabled", as it always was


# `relay clock advance`: seconds added to the wall clock (the lab's simulated time).
CLOCK_OFFSET: Key[float] = Key("clock.offset", _offset, repr)
# `relay domain set-type`, Fix now: an accepted domain's type, over the config file's.
DOMAIN_TYPE: Family[DomainType] = Family("domain.type:", DomainType, lambda kind: kind.value)
# `relay connector enable|disable`: a connector switched on or off, over the config file.
CONNECTOR_ENABLED: Family[bool] = Family(
    "connector.enabled:", _enabled, lambda on: "true" if on else "false"
)
# When the alert of a connector's current episode was notified (epoch seconds).
ALERT_NOTIFIED: Family[float] = Family("alert.notified:", _stamp, repr)
