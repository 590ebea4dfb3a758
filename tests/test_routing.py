"""Routing (issue 3, section 1): mailbox, then the first enabled matching connector, then MX."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from relay.config import Config, parse_config
from relay.policy import Policy
from relay.routing import RouteKind, matches, route
from relay.spool.settings import CONNECTOR_ENABLED
from tests.helpers import config_data, toml_dumps


def _connector(name: str, *domains: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "recipient_domains": list(domains),
        "smart_hosts": ["192.0.2.1:25"],
        **extra,
    }


CONNECTORS = [
    _connector("To on-premises", "onprem.contoso.test"),
    _connector("Disabled partner", "partner.test", enabled=False),
    _connector("Partner wildcard", "*.partner.test", "partner.test"),
    _connector("Shadowed", "sub.partner.test"),  # listed after the wildcard: never chosen
    _connector("Contoso catch-all", "contoso.test"),
]


def _config(connectors: list[dict[str, Any]] = CONNECTORS) -> Config:
    text = toml_dumps(config_data(Path("/nonexistent"), connectors=connectors))
    return parse_config(text, source="test", base_dir=Path("/nonexistent")).config


@pytest.fixture
def policy() -> Policy:
    return Policy.build(_config())


def test_a_listed_mailbox_is_local_even_when_a_connector_matches_its_domain(
    policy: Policy,
) -> None:
    result = route("Alice@Contoso.test", policy)
    assert result.kind is RouteKind.MAILBOX
    assert result.connector is None
    assert result.label == "mailbox"
    assert result.domain == "contoso.test"


def test_an_unlisted_address_of_a_connector_domain_takes_the_connector(policy: Policy) -> None:
    result = route("bob@onprem.contoso.test", policy)
    assert result.kind is RouteKind.CONNECTOR
    assert result.connector is not None
    assert result.label == "To on-premises"


def test_an_unknown_domain_goes_to_the_internet_by_mx(policy: Policy) -> None:
    result = route("someone@fabrikam.test", policy)
    assert result.kind is RouteKind.MX
    assert result.connector is None
    assert result.label == "mx"
    assert result.domain == "fabrikam.test"


def test_a_disabled_connector_is_skipped_for_the_next_match(policy: Policy) -> None:
    assert route("x@partner.test", policy).label == "Partner wildcard"


def test_the_first_matching_connector_wins(policy: Policy) -> None:
    assert route("x@sub.partner.test", policy).label == "Partner wildcard"


def test_disabling_a_connector_at_runtime_moves_its_mail_to_mx() -> None:
    policy = Policy.build(_config(), {CONNECTOR_ENABLED("To on-premises").text: "false"})
    assert route("bob@onprem.contoso.test", policy).label == "mx"


def test_with_every_matching_connector_disabled_the_route_is_mx() -> None:
    connectors = [_connector("Off", "partner.test", "*.partner.test", enabled=False)]
    policy = Policy.build(_config(connectors))
    assert route("x@partner.test", policy).kind is RouteKind.MX
    assert route("x@a.partner.test", policy).kind is RouteKind.MX


@pytest.mark.parametrize(
    ("pattern", "domain", "expected"),
    [
        ("example.com", "example.com", True),
        ("example.com", "mail.example.com", False),
        ("*.example.com", "mail.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),  # subdomains only
        ("*.example.com", "badexample.com", False),
        ("*.example.com", "example.com.evil.test", False),
        ("example.com", "example.co", False),
    ],
)
def test_matches(pattern: str, domain: str, expected: bool) -> None:
    assert matches(pattern, domain) is expected


def test_a_wildcard_connector_does_not_take_its_parent_domain() -> None:
    policy = Policy.build(_config([_connector("Subs only", "*.example.com")]))
    assert route("a@example.com", policy).label == "mx"
    assert route("a@eu.example.com", policy).label == "Subs only"


def test_connector_domains_match_case_insensitively() -> None:
    policy = Policy.build(_config([_connector("Mixed case", "Partner.TEST")]))
    assert route("x@PARTNER.test", policy).label == "Mixed case"


def test_connector_routes_share_a_key_per_connector_and_mx_per_domain(policy: Policy) -> None:
    a, b = route("a@sub.partner.test", policy), route("b@partner.test", policy)
    assert a.key == b.key
    assert route("a@one.test", policy).key != route("a@two.test", policy).key


def test_remembered_routes_follow_the_policy_they_came_from(policy: Policy) -> None:
    """route() remembers its answer per domain in the policy; a changed policy (a new
    object, as `relay connector disable` makes) answers afresh."""
    first = route("a@onprem.contoso.test", policy)
    assert route("b@ONPREM.contoso.test", policy) is first  # same domain: remembered
    assert first.kind is RouteKind.CONNECTOR and first.label == "To on-premises"
    changed = Policy.build(_config(), {CONNECTOR_ENABLED("To on-premises").text: "false"})
    assert route("a@onprem.contoso.test", changed).kind is RouteKind.MX
    assert route("a@onprem.contoso.test", policy).label == "To on-premises"


def test_policy_memo_stays_bounded(policy: Policy) -> None:
    from relay.policy import MEMO_SIZE

    for n in range(MEMO_SIZE + 10):
        route(f"u@d{n}.example.test", policy)
        assert policy.may_relay(f"192.0.2.{n % 250}") is False
    assert len(policy.memo) <= MEMO_SIZE
    assert policy.may_relay("127.0.0.1") is True


# ---- postmaster and sender-specified routing (issue 10) -------------------------------------


@pytest.mark.parametrize(
    "address",
    ["postmaster", "PostMaster", "postmaster@contoso.test", "POSTMASTER@onprem.contoso.test"],
)
def test_postmaster_is_a_mailbox_routed_to_the_postmaster_maildir(
    policy: Policy, address: str
) -> None:
    """RFC 5321 section 4.5.1: postmaster, bare or at any accepted domain."""
    assert policy.is_mailbox(address)
    assert policy.mailbox_for(address) == "postmaster@contoso.test"
    result = route(address, policy)
    assert result.kind is RouteKind.MAILBOX
    assert result.domain == "contoso.test"


def test_other_addresses_are_their_own_maildir(policy: Policy) -> None:
    assert policy.mailbox_for("Alice@Contoso.test") == "Alice@Contoso.test"
    assert not policy.is_mailbox("postmaster@fabrikam.test")
    assert not policy.is_mailbox("webmaster")


def test_a_configured_postmaster_mailbox() -> None:
    text = toml_dumps(
        config_data(
            Path("/nonexistent"),
            connectors=CONNECTORS,
            mailboxes={"postmaster": "Admin@Contoso.test"},
        )
    )
    config = parse_config(text, source="test", base_dir=Path("/nonexistent")).config
    assert Policy.build(config).mailbox_for("postmaster") == "Admin@contoso.test"


def test_the_domain_of_a_bare_local_part_is_empty() -> None:
    from relay.policy import domain_of

    assert domain_of("postmaster") == ""
    assert domain_of('"a@b"@Contoso.TEST') == "contoso.test"


@pytest.mark.parametrize(
    ("address", "source_route", "trusted", "expected"),
    [
        ("u%fabrikam.test@onprem.contoso.test", False, False, "550 5.7.64"),
        ("fabrikam.test!u@onprem.contoso.test", False, False, "550 5.7.64"),
        ('"u@fabrikam.test"@onprem.contoso.test', False, False, "550 5.7.64"),
        ("u@onprem.contoso.test", True, False, "550 5.7.64"),
        ("u%fabrikam.test@onprem.contoso.test", False, True, "250 2.1.5"),
        ("u@onprem.contoso.test", True, True, "250 2.1.5"),
        ("postmaster", False, False, "250 2.1.5"),
    ],
)
def test_sender_specified_routing_needs_a_client_that_may_relay(
    policy: Policy, address: str, source_route: bool, trusted: bool, expected: str
) -> None:
    client = "127.0.0.1" if trusted else "192.0.2.7"
    reply = policy.rcpt_reply(address, client_ip=client, source_route=source_route)
    assert reply.startswith(expected), reply


def test_the_memo_is_a_cache_not_part_of_the_policy(policy: Policy) -> None:
    """A policy that has answered questions equals one that has not, and a copy made with
    dataclasses.replace starts with nothing remembered."""
    fresh = Policy.build(_config())
    route("a@onprem.contoso.test", policy)
    assert policy.may_relay("127.0.0.1") is True
    assert len(policy.memo) == 2 and len(fresh.memo) == 0
    assert policy == fresh
    assert len(dataclasses.replace(policy, postmaster="pm@contoso.test").memo) == 0
