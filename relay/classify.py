"""Classification: the one table from what happened on the wire to a delivery outcome.

Pure. The delivery agent reports a `WireEvent` (where the session was, what failed, the
remote's reply if it gave one); `classify` turns it into an `Outcome`: the mail flow
intelligence code (shared/seed/mail-flow-intelligence.md), whether to retry, and the
Exchange Online "last error" line the queue shows. The queue manager's own verdicts, a
recipient that expired or that Fix now found missing, are events of this table too
(`expiry`, `not_found`): no other module writes a last error line.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from relay import codes
from relay.codes import MailFlowCode
from relay.net import endpoint
from relay.text import UNSAFE, escaped


class Stage(StrEnum):
    """Where in the session something went wrong."""

    RESOLVE = "resolve"
    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    QUEUE = "queue"  # not on the wire: the queue manager gave up on it (expiry, Fix now)


class Failure(StrEnum):
    """What went wrong, in wire terms."""

    DNS_NXDOMAIN = "nxdomain"  # the name does not exist
    DNS_SERVFAIL = "servfail"
    DNS_NO_ANSWER = "no-answer"  # the name exists but has no address
    DNS_TIMEOUT = "dns-timeout"
    DOMAIN_NXDOMAIN = "domain-nxdomain"  # the recipient's own domain does not exist
    TIMEOUT = "timeout"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"  # no route, network down: cannot connect
    CLOSED = "closed"  # EOF or reset after connecting
    REPLY = "reply"  # the remote answered with an error; see `reply`
    TLS_NOT_OFFERED = "tls-not-offered"
    TLS_FAILED = "tls-failed"  # STARTTLS handshake failed (not a certificate problem)
    CERT_EXPIRED = "cert-expired"
    CERT_NAME = "cert-name"
    CERT_UNTRUSTED = "cert-untrusted"
    CERT_INVALID = "cert-invalid"
    # Not the destination's doing: the message cannot be carried by SMTP at all (an address
    # holding a CR, say), so no retry can help; the agent raises it before sending anything.
    UNSENDABLE = "unsendable"
    # Nor this: the relay itself failed while delivering (an unexpected exception). The
    # recipient waits for its next retry interval, with the reason as its last error.
    INTERNAL = "internal"
    # Nor these: no attempt was made, the queue manager gave up on the recipient.
    EXPIRED = "expired"  # its message's time in the queue is up
    NOT_FOUND = "not-found"  # Fix now: its domain is authoritative and it does not exist


CERTIFICATE_FAILURES = frozenset(
    {Failure.CERT_EXPIRED, Failure.CERT_NAME, Failure.CERT_UNTRUSTED, Failure.CERT_INVALID}
)
# The relay's own doing: they say nothing about whether the destination is reachable.
LOCAL_FAILURES = frozenset({Failure.UNSENDABLE, Failure.INTERNAL})
# The queue manager's verdicts, without an attempt (relay.states' give-up events).
GIVE_UP_FAILURES = frozenset({Failure.EXPIRED, Failure.NOT_FOUND})
DNS_FAILURES = frozenset(
    {Failure.DNS_NXDOMAIN, Failure.DNS_SERVFAIL, Failure.DNS_NO_ANSWER, Failure.DNS_TIMEOUT}
)


@dataclass(frozen=True, slots=True)
class WireEvent:
    stage: Stage
    failure: Failure
    detail: str  # what the agent saw, in words ("connect to 127.0.0.1:2526: Connection refused")
    server: str | None = None  # the smart host or MX name tried last
    ip: str | None = None
    port: int | None = None
    code: int | None = None  # the remote's reply code, for Failure.REPLY
    reply: str = ""  # the remote's reply text, for Failure.REPLY
    last_code: str | None = None  # for Failure.EXPIRED: the last attempt's code, which it names
    tls: str | None = None  # the session's TLS protocol when it failed ("TLSv1.3"), for logs


class Verdict(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    code: str  # "4.4.316", or the remote's enhanced code ("4.7.1", "5.1.1")
    title: str
    reply: str  # the Exchange-style last error line (the LED)
    mail_flow: MailFlowCode | None
    server: str | None
    ip: str | None  # "ip:port" as in LastAttemptedIP
    final_reply: str = ""  # for a permanent failure: the 5xx line the NDR quotes

    @property
    def permanent(self) -> bool:
        return self.verdict is Verdict.PERMANENT


# The table (issue 3, section 3). Remote replies are not in it: they keep their own code.
_TABLE: dict[Failure, MailFlowCode] = {
    Failure.DNS_NXDOMAIN: codes.DNS_QUERY_FAILED,
    Failure.DNS_SERVFAIL: codes.DNS_QUERY_FAILED,
    Failure.DNS_NO_ANSWER: codes.DNS_QUERY_FAILED,
    Failure.DNS_TIMEOUT: codes.DNS_QUERY_FAILED,
    Failure.TIMEOUT: codes.CONNECTION_TIMED_OUT,
    Failure.REFUSED: codes.CONNECTION_REFUSED,
    Failure.UNREACHABLE: codes.CANNOT_CONNECT,
    Failure.TLS_NOT_OFFERED: codes.CANNOT_CONNECT,
    Failure.TLS_FAILED: codes.CANNOT_CONNECT,
    Failure.CLOSED: codes.CLOSED_ABRUPTLY,
    Failure.CERT_EXPIRED: codes.CERTIFICATE_VALIDATION_FAILED,
    Failure.CERT_NAME: codes.CERTIFICATE_VALIDATION_FAILED,
    Failure.CERT_UNTRUSTED: codes.CERTIFICATE_VALIDATION_FAILED,
    Failure.CERT_INVALID: codes.CERTIFICATE_VALIDATION_FAILED,
}

# RFC 3463: 5.1.7 bad sender's address, 5.1.3 bad destination address syntax, 5.6.0 other
# media (content) error.
_UNSENDABLE_STATUS = {Stage.MAIL: "5.1.7", Stage.RCPT: "5.1.3"}
# Postfix's words for its own failure while handling a message (RFC 3463: 4.3.0).
LOCAL_ERROR = "451 4.3.0 Error: local error in processing"

# A recipient domain that does not exist fails at once, like Exchange Online's NDR.
DOMAIN_NOT_FOUND = "550 5.4.310 DNS domain {domain} does not exist"

# Fix now (an internal_relay domain made authoritative): queued mail for addresses that do
# not exist there fails at once, as Exchange Online's recipient resolution does.
RECIPIENT_NOT_FOUND = (
    "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
)


def expiry(*, last_code: str | None, server: str | None, ip: str | None) -> WireEvent:
    """A recipient whose message expired: its line follows the last attempt's mail flow code
    (`codes.expired_reply`), and it keeps that attempt's server and LastAttemptedIP (`ip` as
    recorded, "ip:port")."""
    return WireEvent(Stage.QUEUE, Failure.EXPIRED, "", server=server, ip=ip, last_code=last_code)


def not_found(*, server: str | None, ip: str | None) -> WireEvent:
    """A recipient Fix now found missing; it keeps its last attempt's server and ip."""
    return WireEvent(Stage.QUEUE, Failure.NOT_FOUND, "", server=server, ip=ip)


def classify(event: WireEvent) -> Outcome:
    # A remote's reply (or an exception's text) may hold a CR or bytes that are not UTF-8
    # (aiosmtplib decodes replies with surrogateescape): never into the store, a log or an
    # NDR as they came. The line breaks of a multi-line reply become spaces, as in the LED.
    if UNSAFE.search(event.reply) or UNSAFE.search(event.detail):
        event = replace(event, reply=_one_line(event.reply), detail=_one_line(event.detail))
    endpoint = _endpoint(event)
    if event.failure is Failure.DOMAIN_NXDOMAIN:
        line = DOMAIN_NOT_FOUND.format(domain=event.server or "")
        return Outcome(
            Verdict.PERMANENT,
            "5.4.310",
            "DNS domain does not exist",
            line,
            None,
            event.server,
            None,
            final_reply=line,
        )
    if event.failure is Failure.REPLY:
        return _remote_reply(event, endpoint)
    if event.failure is Failure.UNSENDABLE:
        status = _UNSENDABLE_STATUS.get(event.stage, "5.6.0")
        line = f"550 {status} {event.detail}"
        return Outcome(
            Verdict.PERMANENT,
            status,
            "Message cannot be sent",
            line,
            None,
            event.server,
            endpoint,
            final_reply=line,
        )
    if event.failure is Failure.INTERNAL:
        line = f"{LOCAL_ERROR} ({event.detail})"
        return Outcome(
            Verdict.TRANSIENT,
            "4.3.0",
            "Local error in processing",
            line,
            None,
            event.server,
            endpoint,
        )
    if event.failure is Failure.EXPIRED:
        return _given_up(codes.expired_reply(event.last_code), "Message expired", event, endpoint)
    if event.failure is Failure.NOT_FOUND:
        return _given_up(RECIPIENT_NOT_FOUND, "Recipient not found", event, endpoint)
    mail_flow = _TABLE[event.failure]
    line = codes.led(
        mail_flow,
        reply=mail_flow.reply,
        message=event.detail,
        server=event.server,
        ip=event.ip,
        port=event.port,
    )
    return Outcome(
        Verdict.TRANSIENT, mail_flow.code, mail_flow.title, line, mail_flow, event.server, endpoint
    )


def _remote_reply(event: WireEvent, endpoint: str | None) -> Outcome:
    code = event.code or 451
    remote = f"{code} {event.reply}".strip()
    # The greeting or EHLO answered with an error (421 Service not available): the server
    # would not talk to us at all, which Exchange reports as 4.4.317 with the reply inside.
    if event.stage in (Stage.GREETING, Stage.EHLO, Stage.STARTTLS):
        mail_flow = codes.CANNOT_CONNECT
        line = codes.led(
            mail_flow,
            reply=mail_flow.reply,
            message=remote,
            server=event.server,
            ip=event.ip,
            port=event.port,
        )
        return Outcome(
            Verdict.TRANSIENT,
            mail_flow.code,
            mail_flow.title,
            line,
            mail_flow,
            event.server,
            endpoint,
        )
    verdict = Verdict.PERMANENT if 500 <= code < 600 else Verdict.TRANSIENT
    enhanced = codes.status_of(remote)
    line = codes.led(
        None, reply=remote, message="", server=event.server, ip=event.ip, port=event.port
    )
    return Outcome(
        verdict,
        enhanced,
        _title(event.reply),
        line,
        None,
        event.server,
        endpoint,
        final_reply=remote,
    )


def _given_up(line: str, title: str, event: WireEvent, endpoint: str | None) -> Outcome:
    """Final without an attempt: the line is the verdict the queue shows and the NDR quotes."""
    return Outcome(
        Verdict.PERMANENT,
        codes.status_of(line),
        title,
        line,
        None,
        event.server,
        endpoint,
        final_reply=line,
    )


def _one_line(text: str) -> str:
    return escaped(" ".join(text.split()))


def _title(reply: str) -> str:
    """The remote's words without its enhanced code: "User unknown"."""
    words = reply.split(" ", 1)
    if len(words) == 2 and words[0][:1] in "245" and words[0].count(".") == 2:
        return words[1]
    return reply


def _endpoint(event: WireEvent) -> str | None:
    return None if event.ip is None else endpoint(event.ip, event.port)
