"""Routing: where one recipient goes (a local mailbox, a connector, or the internet by MX).

Pure: a function of the address and the effective policy, the way Exchange Online picks an
outbound connector (first enabled one whose recipient domains match) before falling back to
MX delivery.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from relay.config import Connector
from relay.policy import Policy, domain_of

MAILBOX = "mailbox"
MX = "mx"


class RouteKind(StrEnum):
    MAILBOX = "mailbox"
    CONNECTOR = "connector"
    MX = "mx"


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    domain: str
    connector: Connector | None = None

    @property
    def label(self) -> str:
        """What the recipient's `connector` field records: a connector name, "mailbox" or "mx"."""
        if self.connector is not None:
            return self.connector.name
        return MAILBOX if self.kind is RouteKind.MAILBOX else MX

    @property
    def key(self) -> str:
        """Recipients with the same key can share one SMTP transaction."""
        if self.kind is RouteKind.CONNECTOR and self.connector is not None:
            if self.connector.use_mx:
                return f"connector:{self.connector.name}:{self.domain}"
            return f"connector:{self.connector.name}"
        return f"{self.kind.value}:{self.domain}"


def matches(pattern: str, domain: str) -> bool:
    """A connector's recipient domain: exact, or "*.example.com" for its subdomains."""
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def route(address: str, policy: Policy) -> Route:
    if policy.is_mailbox(address):
        # Postmaster, bare or at any accepted domain, is delivered to one local Maildir
        # (RFC 5321 section 4.5.1): route it as that mailbox.
        return Route(RouteKind.MAILBOX, domain_of(policy.mailbox_for(address)))
    domain = domain_of(address)
    known = policy.memo.get(("route", domain))
    if known is not None:
        return known  # type: ignore[no-any-return]
    return policy.memo.remember(("route", domain), _route_domain(domain, policy))


def _route_domain(domain: str, policy: Policy) -> Route:
    for connector in policy.connectors:
        if connector.enabled and any(matches(p, domain) for p in connector.recipient_domains):
            return Route(RouteKind.CONNECTOR, domain, connector)
    return Route(RouteKind.MX, domain)
