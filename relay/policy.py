"""The tenant's effective policy: accepted domains and connectors from the config, with the
lab's runtime changes (`relay domain set-type`, `relay connector disable`, Fix now) on top.

Runtime changes live in the spool's settings (relay.spool.settings: DOMAIN_TYPE,
CONNECTOR_ENABLED), so they survive restarts and reach a running server; `Policy.build` is
pure: it reads a snapshot of them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from relay.config import Config, Connector, DomainType
from relay.spool.settings import CONNECTOR_ENABLED, DOMAIN_TYPE, Stored

T = TypeVar("T")

MEMO_SIZE = 4096  # answers a policy keeps (see _Memo)

# Exchange Online's replies at RCPT (shared/reference/exchange-online.md).
RCPT_OK = "250 2.1.5 Recipient OK"
RCPT_ACCESS_DENIED = "550 5.4.1 Recipient address rejected: Access denied"
RCPT_RELAY_DENIED = "550 5.7.64 TenantAttribution; Relay Access Denied"

# RFC 5321 section 4.5.1: every SMTP server takes mail for "postmaster", without a domain
# and at each domain it serves, case-insensitively.
POSTMASTER = "postmaster"


def has_routing_syntax(address: str) -> bool:
    """Sender-specified routing in the local part: user%elsewhere@domain,
    elsewhere!user@domain or "user@elsewhere"@domain (Postfix: allow_untrusted_routing)."""
    local = address.rpartition("@")[0]
    return "%" in local or "!" in local or "@" in local


class _Memo:
    """Answers a policy worked out before, by question: the one thing in a Policy that
    changes, and only a cache.

    Parsing addresses and matching patterns for the same few clients and domains over and
    over was a few percent of the relay's CPU time. A policy is replaced, never changed,
    when the lab changes it, so an answer never goes stale; forgetting them all (at
    MEMO_SIZE) only costs the time to work them out again.
    """

    __slots__ = ("_answers",)

    def __init__(self) -> None:
        self._answers: dict[tuple[str, str], Any] = {}

    def get(self, question: tuple[str, str]) -> Any:
        """The answer remembered for `question`, or None."""
        return self._answers.get(question)

    def remember(self, question: tuple[str, str], answer: T) -> T:
        if len(self._answers) >= MEMO_SIZE:
            self._answers.clear()
        self._answers[question] = answer
        return answer

    def __len__(self) -> int:
        return len(self._answers)


@dataclass(frozen=True)
class Policy:
    domains: Mapping[str, DomainType]
    mailboxes: frozenset[str]
    connectors: tuple[Connector, ...]
    relay_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    # The Maildir postmaster mail goes to, and the addresses that are postmaster (lowercase:
    # "postmaster" and postmaster@<each accepted domain>).
    postmaster: str = f"{POSTMASTER}@localhost"
    postmasters: frozenset[str] = frozenset({POSTMASTER})
    # may_relay's answers by client address, routing's by domain (see _Memo).
    memo: _Memo = field(default_factory=_Memo, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, config: Config, overrides: Stored | None = None) -> Policy:
        """The config file's policy with the runtime changes in `overrides` (the spool's
        settings) on top."""
        overrides = overrides or {}
        domains = {
            d.name: _or(DOMAIN_TYPE(d.name).read(overrides), d.type)
            for d in config.accepted_domains
        }
        connectors = tuple(
            c.model_copy(
                update={"enabled": _or(CONNECTOR_ENABLED(c.name).read(overrides), c.enabled)}
            )
            for c in config.connectors
        )
        return cls(
            domains=domains,
            mailboxes=frozenset(m.lower() for d in config.accepted_domains for m in d.mailboxes),
            connectors=connectors,
            relay_networks=tuple(config.smtp.relay_networks),
            postmaster=config.postmaster_mailbox,
            postmasters=frozenset(
                {POSTMASTER, *(f"{POSTMASTER}@{d.name}" for d in config.accepted_domains)}
            ),
        )

    def is_mailbox(self, address: str) -> bool:
        """A local mailbox: a listed one, or postmaster (delivered to `mailbox_for`)."""
        lowered = address.lower()
        return lowered in self.mailboxes or lowered in self.postmasters

    def is_postmaster(self, address: str) -> bool:
        return address.lower() in self.postmasters

    def mailbox_for(self, address: str) -> str:
        """The mailbox whose Maildir gets mail for this (local) address."""
        return self.postmaster if address.lower() in self.postmasters else address

    def domain_type(self, address: str) -> DomainType | None:
        return self.domains.get(domain_of(address))

    def may_relay(self, client_ip: str) -> bool:
        verdict = self.memo.get(("relay", client_ip))
        if verdict is None:
            verdict = self.memo.remember(("relay", client_ip), self._may_relay(client_ip))
        return bool(verdict)

    def _may_relay(self, client_ip: str) -> bool:
        try:
            ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.relay_networks)

    def rcpt_reply(self, address: str, *, client_ip: str, source_route: bool = False) -> str:
        """Exchange Online's verdict on RCPT TO: accept, or the exact rejection.

        `source_route`: the path had one (<@a,@b:user@domain>); the address is without it.
        """
        if self.is_postmaster(address):
            return RCPT_OK  # RFC 5321 section 4.5.1: from any client
        kind = self.domain_type(address)
        # Sender-specified routing from a client that may not relay is a relay attempt,
        # whatever the domain (Postfix: allow_untrusted_routing = no, its default).
        routed = source_route or has_routing_syntax(address)
        if (kind is None or routed) and not self.may_relay(client_ip):
            return RCPT_RELAY_DENIED
        if kind is None or self.is_mailbox(address) or kind is DomainType.INTERNAL_RELAY:
            return RCPT_OK
        return RCPT_ACCESS_DENIED


def _or(changed: T | None, configured: T) -> T:
    return configured if changed is None else changed


def domain_of(address: str) -> str:
    """The domain, lowercase; "" for a bare local part (RCPT TO:<postmaster>)."""
    _, at, domain = address.rpartition("@")
    return domain.lower() if at else ""
