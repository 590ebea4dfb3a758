"""What a lab administrator can do to the relay: queue actions, runtime policy, the clock.

The CLI calls these; they write to the store in one transaction each, so they work with the
server stopped, and a running server picks the change up within about a second
(PRAGMA data_version, see relay.server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay import alerts, errors
from relay.clock import Clock, iso
from relay.config import ConnectorType, DomainType, LoadedConfig
from relay.policy import CONNECTOR_ENABLED_KEY, DOMAIN_TYPE_KEY, Policy
from relay.routing import matches
from relay.runtime import CLOCK_OFFSET_KEY, load_clock_offset, load_policy
from relay.spool.rows import DigestRow
from relay.store import Store
from relay.units import format_duration


class AdminError(errors.RelayError):
    """A request that names something that does not exist, or cannot be done."""


async def clock_for(store: Store) -> Clock:
    return Clock(offset=await load_clock_offset(store))


def clock_note(clock: Clock) -> str:
    if not clock.offset:
        return ""
    sign = "+" if clock.offset > 0 else "-"
    return (
        f"lab clock is offset by {sign}{format_duration(abs(clock.offset))}: "
        f"now is {iso(clock.now())} (relay clock reset to undo)"
    )


# ---- the queue -----------------------------------------------------------------------


async def require_message(store: Store, message: int) -> None:
    if not await store.message_exists(message):
        raise AdminError(f"no message with ID {message} in the queue (see `relay queue list`)")


async def retry(store: Store, *, message: int | None = None, connector: str | None = None) -> int:
    if message is not None:
        await require_message(store, message)
    clock = await clock_for(store)
    return await store.retry(now=clock.now(), message=message, connector=connector)


async def hold(store: Store, message: int) -> int:
    await require_message(store, message)
    return await store.hold(message)


async def release(store: Store, message: int) -> int:
    await require_message(store, message)
    return await store.release(message, now=(await clock_for(store)).now())


async def expire(store: Store, message: int) -> int:
    await require_message(store, message)
    return await store.expire(message, now=(await clock_for(store)).now())


async def delete(store: Store, message: int) -> int:
    await require_message(store, message)
    return await store.delete(message)


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


async def domains(store: Store, loaded: LoadedConfig) -> list[DomainView]:
    policy = await load_policy(store, loaded)
    return [
        DomainView(d.name, policy.domains[d.name], d.type, tuple(d.mailboxes))
        for d in loaded.config.accepted_domains
    ]


async def connectors(store: Store, loaded: LoadedConfig) -> list[ConnectorView]:
    policy = await load_policy(store, loaded)
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


async def set_domain_type(store: Store, loaded: LoadedConfig, name: str, kind: DomainType) -> str:
    domain = _domain(loaded, name)
    await store.set_setting(DOMAIN_TYPE_KEY + domain, kind.value)
    if kind is DomainType.AUTHORITATIVE:
        # Queued mail for unknown recipients there fails now, not at its next retry.
        await store.retry_domains([domain], now=(await clock_for(store)).now())
    return domain


async def reset_domains(store: Store, loaded: LoadedConfig, name: str | None) -> list[str]:
    names = [_domain(loaded, name)] if name else [d.name for d in loaded.config.accepted_domains]
    for domain in names:
        await store.set_setting(DOMAIN_TYPE_KEY + domain, None)
    return names


async def set_connector_enabled(
    store: Store, loaded: LoadedConfig, name: str, enabled: bool
) -> str:
    connector = connector_name(loaded, name)
    await store.set_setting(CONNECTOR_ENABLED_KEY + connector, "true" if enabled else "false")
    await store.retry(now=(await clock_for(store)).now(), connector=connector)
    return connector


async def reset_connectors(store: Store, loaded: LoadedConfig, name: str | None) -> list[str]:
    names = [connector_name(loaded, name)] if name else [c.name for c in loaded.config.connectors]
    for connector in names:
        await store.set_setting(CONNECTOR_ENABLED_KEY + connector, None)
    return names


async def fix_now(store: Store, loaded: LoadedConfig, name: str) -> list[str]:
    """The seed's Fix now: the internal relay domains this connector serves become
    authoritative, so mail for recipients that do not exist is rejected at once."""
    wanted = connector_name(loaded, name)
    policy = await load_policy(store, loaded)
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
        await set_domain_type(store, loaded, domain, DomainType.AUTHORITATIVE)
    return changed


async def current_alerts(store: Store, loaded: LoadedConfig) -> list[alerts.Alert]:
    policy: Policy = await load_policy(store, loaded)
    notified = await store.settings(alerts.NOTIFIED_KEY)
    return alerts.alerts(await store.digest(), policy, notified)


# ---- the lab clock -------------------------------------------------------------------


async def advance_clock(store: Store, seconds: float) -> Clock:
    offset = await load_clock_offset(store) + seconds
    await store.set_setting(CLOCK_OFFSET_KEY, repr(offset))
    return Clock(offset=offset)


async def reset_clock(store: Store) -> Clock:
    await store.set_setting(CLOCK_OFFSET_KEY, None)
    return Clock()
