"""What a lab administrator can do to the relay: queue actions, runtime policy, the clock.

The CLI calls these; they write to the spool in one transaction each, so they work with the
server stopped, and a running server picks the change up within about a second
(`Spool.data_version`, see relay.server). What an action does to each recipient is
`relay.states.step`'s to decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from relay import alerts, errors
from relay.clock import Clock, iso
from relay.config import ConnectorType, DomainType, LoadedConfig
from relay.policy import Policy
from relay.routing import matches
from relay.runtime import load_clock_offset, load_policy
from relay.spool.protocol import Spool
from relay.spool.rows import DigestRow
from relay.spool.settings import (
    ALERT_NOTIFIED,
    CLOCK_OFFSET,
    CONNECTOR_ENABLED,
    DOMAIN_TYPE,
    Family,
)
from relay.states import Event
from relay.units import format_duration
from relay.views import short_time


class AdminError(errors.RelayError):
    """A request that names something that does not exist, or cannot be done."""


async def clock_for(spool: Spool) -> Clock:
    return Clock(offset=await load_clock_offset(spool))


def clock_note(clock: Clock) -> str:
    if not clock.offset:
        return ""
    sign = "+" if clock.offset > 0 else "-"
    return (
        f"lab clock is offset by {sign}{format_duration(abs(clock.offset))}: "
        f"now is {short_time(clock.now())} (relay clock reset to undo)"
    )


# ---- the queue -----------------------------------------------------------------------


async def require_message(spool: Spool, message: int) -> None:
    if not await spool.message_exists(message):
        raise AdminError(f"no message with ID {message} in the queue (see `relay queue list`)")


async def retry(spool: Spool, *, message: int | None = None, connector: str | None = None) -> int:
    """Waiting recipients due now (postqueue -f, Retry-Queue); all of them without filters."""
    if message is not None:
        await require_message(spool, message)
    now = (await clock_for(spool)).now()
    return await spool.change(Event.RETRY_NOW, now=now, message=message, connector=connector)


async def hold(spool: Spool, message: int) -> int:
    """Postfix's hold queue: neither tried nor expired until released."""
    return await _act(spool, Event.HOLD, message)


async def release(spool: Spool, message: int) -> int:
    return await _act(spool, Event.RELEASE, message)


async def expire(spool: Spool, message: int) -> int:
    """Expire now (postsuper -e, exim -Mg): the queue manager turns it into the NDR at once."""
    return await _act(spool, Event.EXPIRE_NOW, message)


async def delete(spool: Spool, message: int) -> int:
    """Remove a message and its recipients without an NDR (postsuper -d)."""
    return await _act(spool, Event.DELETE, message)


async def _act(spool: Spool, event: Event, message: int) -> int:
    await require_message(spool, message)
    return await spool.change(event, now=(await clock_for(spool)).now(), message=message)


def digest_json(row: DigestRow) -> dict[str, Any]:
    error = row.last_error
    return {
        "connector": row.connector,
        "status": _digest_status(row),
        "code": row.code,
        "messages": row.messages,
        "recipients": row.recipients,
        "queue_started_at": iso(row.queue_started_at),
        "next_retry_at": iso(row.next_retry_at),
        "oldest_expires_at": iso(row.oldest_expires_at),
        "last_error": error.reply if error else None,
        "server": error.server if error else None,
        "ip": error.ip if error else None,
    }


def _digest_status(row: DigestRow) -> str:
    """Exchange's queue states: Suspended (all held), Retry (deferred), Ready (waiting)."""
    if row.held == row.recipients:
        return "suspended"
    if row.deferred:
        return "retry"
    return "ready"


# ---- runtime policy: accepted domains and connectors ---------------------------------


@dataclass(frozen=True, slots=True)
class DomainView:
    name: str
    type: DomainType
    config_type: DomainType
    mailboxes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.value,
            "config_type": self.config_type.value,
            "changed": self.type is not self.config_type,
            "mailboxes": list(self.mailboxes),
        }


@dataclass(frozen=True, slots=True)
class ConnectorView:
    name: str
    type: ConnectorType
    enabled: bool
    config_enabled: bool
    recipient_domains: tuple[str, ...]
    destination: str
    tls: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.value,
            "enabled": self.enabled,
            "config_enabled": self.config_enabled,
            "changed": self.enabled != self.config_enabled,
            "recipient_domains": list(self.recipient_domains),
            "destination": self.destination,
            "tls": self.tls,
        }


async def domains(spool: Spool, loaded: LoadedConfig) -> list[DomainView]:
    policy = await load_policy(spool, loaded)
    return [
        DomainView(d.name, policy.domains[d.name], d.type, tuple(d.mailboxes))
        for d in loaded.config.accepted_domains
    ]


async def connectors(spool: Spool, loaded: LoadedConfig) -> list[ConnectorView]:
    policy = await load_policy(spool, loaded)
    effective = {c.name: c for c in policy.connectors}
    return [
        ConnectorView(
            c.name,
            c.type,
            effective[c.name].enabled,
            c.enabled,
            tuple(c.recipient_domains),
            "MX of the recipient domain" if c.use_mx else ", ".join(c.smart_hosts),
            c.tls.value,
        )
        for c in loaded.config.connectors
    ]


def _domain(loaded: LoadedConfig, name: str) -> str:
    wanted = name.lower().rstrip(".")
    for domain in loaded.config.accepted_domains:
        if domain.name == wanted:
            return domain.name
    known = ", ".join(d.name for d in loaded.config.accepted_domains)
    raise AdminError(f"{name!r} is not an accepted domain; the accepted domains are: {known}")


def connector_name(loaded: LoadedConfig, name: str) -> str:
    for connector in loaded.config.connectors:
        if connector.name == name:
            return connector.name
    known = ", ".join(repr(c.name) for c in loaded.config.connectors) or "none"
    raise AdminError(f"no connector named {name!r}; the connectors are: {known}")


async def set_domain_type(spool: Spool, loaded: LoadedConfig, name: str, kind: DomainType) -> str:
    domain = _domain(loaded, name)
    await spool.set_setting(DOMAIN_TYPE(domain), kind)
    if kind is DomainType.AUTHORITATIVE:
        # Queued mail for unknown recipients there fails now, not at its next retry.
        now = (await clock_for(spool)).now()
        await spool.change(Event.RETRY_NOW, now=now, domains=[domain])
    return domain


async def reset_domains(spool: Spool, loaded: LoadedConfig, name: str | None) -> list[str]:
    """Back to the config file's type: one domain, or all of them (name None)."""
    every = [d.name for d in loaded.config.accepted_domains]
    return await _reset(spool, DOMAIN_TYPE, [_domain(loaded, name)] if name else every)


async def set_connector_enabled(
    spool: Spool, loaded: LoadedConfig, name: str, enabled: bool
) -> str:
    connector = connector_name(loaded, name)
    await spool.set_setting(CONNECTOR_ENABLED(connector), enabled)
    now = (await clock_for(spool)).now()
    await spool.change(Event.RETRY_NOW, now=now, connector=connector)
    return connector


async def reset_connectors(spool: Spool, loaded: LoadedConfig, name: str | None) -> list[str]:
    """Back to the config file's enabled flag: one connector, or all of them (name None)."""
    every = [c.name for c in loaded.config.connectors]
    return await _reset(spool, CONNECTOR_ENABLED, [connector_name(loaded, name)] if name else every)


async def _reset(spool: Spool, family: Family[Any], names: Sequence[str]) -> list[str]:
    """Remove the runtime change of each of `names`, so the config file's value applies."""
    for name in names:
        await spool.set_setting(family(name), None)
    return list(names)


async def fix_now(spool: Spool, loaded: LoadedConfig, name: str) -> list[str]:
    """The seed's Fix now: the internal relay domains this connector serves become
    authoritative, so mail for recipients that do not exist is rejected at once."""
    wanted = connector_name(loaded, name)
    policy = await load_policy(spool, loaded)
    connector = next(c for c in policy.connectors if c.name == wanted)
    changed = [
        domain
        for domain, kind in policy.domains.items()
        if kind is DomainType.INTERNAL_RELAY
        and any(matches(p, domain) for p in connector.recipient_domains)
    ]
    if not changed:
        raise AdminError(
            f"no internal relay domain is routed through {wanted!r}; nothing to fix "
            "(see `relay domain list`)"
        )
    for domain in changed:
        await set_domain_type(spool, loaded, domain, DomainType.AUTHORITATIVE)
    return changed


async def current_alerts(spool: Spool, loaded: LoadedConfig) -> list[alerts.Alert]:
    policy: Policy = await load_policy(spool, loaded)
    notified = await spool.settings(ALERT_NOTIFIED)
    return alerts.alerts(await spool.digest(), policy, notified)


# ---- the lab clock -------------------------------------------------------------------


async def advance_clock(spool: Spool, seconds: float) -> Clock:
    offset = await load_clock_offset(spool) + seconds
    await spool.set_setting(CLOCK_OFFSET, offset)
    return Clock(offset=offset)


async def reset_clock(spool: Spool) -> Clock:
    await spool.set_setting(CLOCK_OFFSET, None)
    return Clock()
