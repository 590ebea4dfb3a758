"""The mail flow intelligence codes: the one table of Exchange Online's connector errors.

Codes, titles and reply strings are protocol facts reproduced exactly from Exchange
Online ("Mail flow intelligence in Office 365"); the causes and the how-to-fix text are
our own short wording of that article's guidance.  Everything here is pure data plus a
few string helpers: classification of wire events lives in ``relay.classify``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from relay.net import endpoint

__all__ = [
    "CANNOT_CONNECT",
    "CERTIFICATE_VALIDATION_FAILED",
    "CLOSED_ABRUPTLY",
    "CODES",
    "CONNECTION_REFUSED",
    "CONNECTION_TIMED_OUT",
    "DNS_QUERY_FAILED",
    "OTHER_HOW_TO_FIX",
    "PARTNER_ADVICE",
    "QUEUE_EXPIRED_REPLY",
    "MailFlowCode",
    "expired_code",
    "expired_reply",
    "led",
    "lookup",
    "status_of",
]


@dataclass(frozen=True, slots=True)
class MailFlowCode:
    """One mail flow intelligence code and what Exchange Online says about it."""

    code: str
    """The enhanced status code, e.g. ``"4.4.316"``."""
    title: str
    """Exchange's title, e.g. ``"Connection refused"``."""
    reply: str
    """The transient reply Exchange records, e.g. ``"450 4.4.316 Connection refused"``."""
    expired_reply: str
    """The 550 line a recipient fails with when it expires after this code."""
    causes: tuple[str, ...]
    """Likely causes, most likely first (our wording)."""
    how_to_fix: str
    """What the administrator should do (our wording, 1-3 sentences)."""


# Every code's guidance in the seed article ends with this advice.
PARTNER_ADVICE = "If the error comes from a partner organization, contact the partner to fix it."

DNS_QUERY_FAILED = MailFlowCode(
    code="4.4.312",
    title="DNS query failed",
    reply="450 4.4.312 DNS query failed",
    expired_reply="550 5.4.312 Message expired, DNS query failed",
    causes=(
        "The DNS hosting service for the destination domain has a problem.",
        "The destination domain has expired, so its records cannot be looked up.",
        "The MX or smart host record changed recently and resolvers still cache the old data.",
    ),
    how_to_fix=(
        "Work with the DNS hosting service of the destination domain until the smart host or "
        f"MX name resolves again. {PARTNER_ADVICE}"
    ),
)

CONNECTION_TIMED_OUT = MailFlowCode(
    code="4.4.315",
    title="Connection timed out",
    reply="450 4.4.315 Connection timed out",
    expired_reply="550 5.4.315 Message expired, connection timed out",
    causes=(
        "The destination mail server is down.",
        "The connector's smart host setting points to the wrong IP address.",
    ),
    how_to_fix=(
        "Check that the destination mail server is running and reachable, and that the "
        "connector's smart hosts point to its current address (for example after a change of "
        f"network provider). {PARTNER_ADVICE}"
    ),
)

CONNECTION_REFUSED = MailFlowCode(
    code="4.4.316",
    title="Connection refused",
    reply="450 4.4.316 Connection refused",
    expired_reply="550 5.4.316 Message expired, connection refused",
    causes=(
        "A firewall blocks connections from the relay's IP addresses.",
        "The on-premises mail system was shut down after a full migration to the cloud.",
    ),
    how_to_fix=(
        "If mailboxes still live on-premises, change the firewall to allow TCP port 25 from the "
        "relay to the on-premises mail servers. If on-premises is gone, use Fix now (it makes the "
        "domain authoritative so invalid recipients are rejected at once), or disable the "
        f"connector or make the accepted domain authoritative yourself. {PARTNER_ADVICE}"
    ),
)

CANNOT_CONNECT = MailFlowCode(
    code="4.4.317",
    title="Cannot connect to remote server",
    reply="450 4.4.317 Cannot connect to remote server",
    expired_reply="550 5.4.317 Message expired, cannot connect to remote server",
    causes=(
        "The destination server answered with an immediate error such as service not available.",
        "The connector requires TLS but the destination server does not offer it.",
    ),
    how_to_fix=(
        "Read the error details, then check the TLS settings and certificates on the destination "
        f"servers and the TLS settings of the connector. {PARTNER_ADVICE}"
    ),
)

CLOSED_ABRUPTLY = MailFlowCode(
    code="4.4.318",
    title="Connection was closed abruptly",
    reply="450 4.4.318 Connection was closed abruptly",
    expired_reply="550 5.4.318 Message expired, connection was closed abruptly",
    causes=(
        "A firewall's SMTP inspection rules interfere with the session.",
        "The destination server hangs, crashes or runs out of resources.",
        "The network between the relay and the destination is unreliable.",
    ),
    how_to_fix=(
        "Find which cause applies: check firewall SMTP inspection, the health of the destination "
        f"server, and the network path (ask the network team if it persists). {PARTNER_ADVICE}"
    ),
)

CERTIFICATE_VALIDATION_FAILED = MailFlowCode(
    code="4.7.320",
    title="Certificate validation failed",
    reply="450 4.7.320 Certificate validation failed",
    expired_reply="550 5.7.320 Message expired, certificate validation failed",
    causes=(
        "The destination server's certificate has expired.",
        "The certificate's subject does not match the name the connector expects.",
        "The certificate is no longer valid (for example untrusted or revoked).",
    ),
    how_to_fix=(
        "Fix the destination server's certificate, or the connector's TLS settings, so the "
        f"queued messages can be delivered. {PARTNER_ADVICE}"
    ),
)

CODES: Mapping[str, MailFlowCode] = MappingProxyType(
    {
        c.code: c
        for c in (
            DNS_QUERY_FAILED,
            CONNECTION_TIMED_OUT,
            CONNECTION_REFUSED,
            CANNOT_CONNECT,
            CLOSED_ABRUPTLY,
            CERTIFICATE_VALIDATION_FAILED,
        )
    }
)
"""Every mail flow intelligence code, by its code string (``"4.4.316"``)."""

OTHER_HOW_TO_FIX = (
    "The relay has trouble delivering to the destination server. Use the destination server "
    "and the error details to look for the problem in that environment, or correct the "
    f"connector if its configuration is wrong. {PARTNER_ADVICE}"
)
"""Guidance for any other error code (the seed's "Other error codes")."""

# What Exchange writes when a message expires after an error that is not one of the codes.
QUEUE_EXPIRED_REPLY = "550 4.4.7 QUEUE.Expired; message expired"

# RFC 3463 section 2: class "." subject "." detail, subject and detail 1-3 digits.
# RFC 5321 section 4.2: "ddd" then SP or "-" (continuation) then text.
_REPLY = re.compile(r"^\s*([2-5])\d\d(?:[ -]|$)(?:\s*([245]\.\d{1,3}\.\d{1,3})(?!\S))?")


def final_line(led_line: str) -> str:
    """The reply an NDR quotes: an LED line without its [Message=…] / [LastAttempted…] parts.

    "550 5.1.1 User unknown [LastAttemptedServerName=x] [LastAttemptedIP=1.2.3.4:25]" →
    "550 5.1.1 User unknown"; a line without them is returned as it is.
    """
    return _LED_PARTS.sub("", led_line).rstrip()


_LED_PARTS = re.compile(r"(?:\s+\[(?:Message|LastAttemptedServerName|LastAttemptedIP)=.*?\])+\s*$")


def lookup(code: str) -> MailFlowCode | None:
    """Return the mail flow code for ``"4.4.316"``, or None for any other code."""
    return CODES.get(code.strip())


def expired_reply(last_code: str | None) -> str:
    """Return the 550 line for a recipient that expired after ``last_code``.

    After a mail flow code the line names that code (``550 5.4.316 Message expired,
    connection refused``); after anything else, or no attempt at all, Exchange writes
    ``550 4.4.7 QUEUE.Expired; message expired``.
    """
    code = lookup(last_code) if last_code is not None else None
    return code.expired_reply if code is not None else QUEUE_EXPIRED_REPLY


def expired_code(reply: str) -> MailFlowCode | None:
    """Return the code whose expiry line ``reply`` is, or None for any other reply."""
    status = status_of(reply)
    for code in CODES.values():
        if status_of(code.expired_reply) == status and "expired" in reply.lower():
            return code
    return None


def status_of(reply: str) -> str:
    """Return the enhanced status code of an SMTP reply line.

    ``"550 5.4.316 Message expired, ..."`` gives ``"5.4.316"``.  A reply without one
    (``"550 User unknown"``) gives ``"5.0.0"`` or ``"4.0.0"`` from the basic code's class
    (RFC 3463 section 3.1, "Other undefined status").  The enhanced code is returned as
    written, even when its class disagrees with the basic code: Exchange's
    ``550 4.4.7 QUEUE.Expired`` reports ``Status: 4.4.7``.  Text that is not a reply at all
    gives ``"5.0.0"``, since the callers only ask about failures.
    """
    match = _REPLY.match(reply)
    if match is None:
        return "5.0.0"
    basic_class, enhanced = match.groups()
    if enhanced is not None:
        return enhanced
    return f"{basic_class}.0.0" if basic_class in "245" else "5.0.0"


def _one_line(text: str) -> str:
    # The LED is a single line: fold any CR/LF of a multi-line remote reply into spaces.
    return " ".join(text.split())


def led(
    code: MailFlowCode | None,
    *,
    reply: str,
    message: str,
    server: str | None,
    ip: str | None,
    port: int | None,
) -> str:
    """Return Exchange Online's "last error description" (LED) line for one attempt.

    ``450 4.4.316 Connection refused [Message=<message>] [LastAttemptedServerName=<server>]
    [LastAttemptedIP=<ip>:<port>]`` (one line).  With a mail flow code the line starts with
    the code's reply and ``reply`` is not used; with ``code=None`` (another code) it starts
    with the remote's ``reply`` verbatim.  Exchange leaves out ``LastAttemptedIP`` when the
    DNS query failed: pass ``ip=None``.  ``server=None`` leaves out the server part and an
    empty ``message`` the Message part.  IPv6 addresses are bracketed: ``[2001:db8::1]:25``.
    """
    parts = [code.reply if code is not None else _one_line(reply)]
    if message:
        parts.append(f"[Message={_one_line(message)}]")
    if server is not None:
        parts.append(f"[LastAttemptedServerName={server}]")
    if ip is not None:
        parts.append(f"[LastAttemptedIP={endpoint(ip, port)}]")
    return " ".join(parts)
