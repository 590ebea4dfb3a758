"""Classification (issue 3, section 3): the one table from wire events to outcomes. Pure."""

from __future__ import annotations

import pytest

from relay import codes
from relay.classify import (
    CERTIFICATE_FAILURES,
    DNS_FAILURES,
    GIVE_UP_FAILURES,
    LOCAL_FAILURES,
    RECIPIENT_NOT_FOUND,
    Failure,
    Stage,
    Verdict,
    WireEvent,
    classify,
    expiry,
    not_found,
)

SERVER = "mail.onprem.contoso.test"
IP = "192.0.2.25"

# Failure -> (stage it happens at, the mail flow code it must give).
TABLE: dict[Failure, tuple[Stage, codes.MailFlowCode]] = {
    Failure.DNS_NXDOMAIN: (Stage.RESOLVE, codes.DNS_QUERY_FAILED),
    Failure.DNS_SERVFAIL: (Stage.RESOLVE, codes.DNS_QUERY_FAILED),
    Failure.DNS_NO_ANSWER: (Stage.RESOLVE, codes.DNS_QUERY_FAILED),
    Failure.DNS_TIMEOUT: (Stage.RESOLVE, codes.DNS_QUERY_FAILED),
    Failure.TIMEOUT: (Stage.CONNECT, codes.CONNECTION_TIMED_OUT),
    Failure.REFUSED: (Stage.CONNECT, codes.CONNECTION_REFUSED),
    Failure.UNREACHABLE: (Stage.CONNECT, codes.CANNOT_CONNECT),
    Failure.CLOSED: (Stage.DATA, codes.CLOSED_ABRUPTLY),
    Failure.TLS_NOT_OFFERED: (Stage.STARTTLS, codes.CANNOT_CONNECT),
    Failure.TLS_FAILED: (Stage.STARTTLS, codes.CANNOT_CONNECT),
    Failure.CERT_EXPIRED: (Stage.STARTTLS, codes.CERTIFICATE_VALIDATION_FAILED),
    Failure.CERT_NAME: (Stage.STARTTLS, codes.CERTIFICATE_VALIDATION_FAILED),
    Failure.CERT_UNTRUSTED: (Stage.STARTTLS, codes.CERTIFICATE_VALIDATION_FAILED),
    Failure.CERT_INVALID: (Stage.STARTTLS, codes.CERTIFICATE_VALIDATION_FAILED),
}


def test_the_table_covers_every_failure_but_replies_missing_domains_and_our_own() -> None:
    ours = {Failure.UNSENDABLE, Failure.INTERNAL}  # the relay's doing, not the destination's
    assert ours == LOCAL_FAILURES
    # The queue manager's verdicts without an attempt: an expiry, a Fix now not found.
    given_up = {Failure.EXPIRED, Failure.NOT_FOUND}
    assert given_up == GIVE_UP_FAILURES
    assert set(TABLE) | {Failure.REPLY, Failure.DOMAIN_NXDOMAIN} | ours | given_up == set(Failure)


@pytest.mark.parametrize("failure", list(TABLE), ids=str)
def test_each_failure_gives_its_mail_flow_code(failure: Failure) -> None:
    stage, expected = TABLE[failure]
    ip = None if failure in DNS_FAILURES else IP
    outcome = classify(WireEvent(stage, failure, "what happened", server=SERVER, ip=ip, port=25))
    assert outcome.verdict is Verdict.TRANSIENT
    assert not outcome.permanent
    assert outcome.mail_flow is expected
    assert outcome.code == expected.code
    assert outcome.title == expected.title
    assert outcome.reply.startswith(expected.reply + " [Message=what happened]")
    assert outcome.server == SERVER
    assert outcome.final_reply == ""


def test_the_led_line_with_an_ip() -> None:
    event = WireEvent(
        Stage.CONNECT,
        Failure.REFUSED,
        "connect to 192.0.2.25:2526 failed: connection refused",
        server=SERVER,
        ip=IP,
        port=2526,
    )
    outcome = classify(event)
    assert outcome.reply == (
        "450 4.4.316 Connection refused "
        "[Message=connect to 192.0.2.25:2526 failed: connection refused] "
        f"[LastAttemptedServerName={SERVER}] [LastAttemptedIP={IP}:2526]"
    )
    assert outcome.ip == f"{IP}:2526"


def test_the_led_line_without_an_ip_when_dns_failed() -> None:
    event = WireEvent(
        Stage.RESOLVE,
        Failure.DNS_NXDOMAIN,
        f"{SERVER} does not exist (NXDOMAIN)",
        server=SERVER,
    )
    outcome = classify(event)
    assert outcome.reply == (
        f"450 4.4.312 DNS query failed [Message={SERVER} does not exist (NXDOMAIN)] "
        f"[LastAttemptedServerName={SERVER}]"
    )
    assert outcome.ip is None
    assert "LastAttemptedIP" not in outcome.reply


def test_an_ipv6_endpoint_is_bracketed() -> None:
    event = WireEvent(Stage.CONNECT, Failure.REFUSED, "refused", server="::1", ip="::1", port=25)
    outcome = classify(event)
    assert outcome.reply.endswith("[LastAttemptedIP=[::1]:25]")
    assert outcome.ip == "[::1]:25"


@pytest.mark.parametrize("failure", sorted(CERTIFICATE_FAILURES), ids=str)
def test_certificate_details_stay_in_the_message(failure: Failure) -> None:
    detail = "CertificateExpired: certificate has expired (connector TLS: certificate_validation)"
    event = WireEvent(Stage.STARTTLS, failure, detail, server=SERVER, ip=IP, port=25)
    assert f"[Message={detail}]" in classify(event).reply


@pytest.mark.parametrize("stage", [Stage.MAIL, Stage.RCPT, Stage.DATA])
def test_a_remote_4xx_is_transient_and_kept_verbatim(stage: Stage) -> None:
    event = WireEvent(
        stage,
        Failure.REPLY,
        "451 4.7.1 Greylisted, try again later",
        server=SERVER,
        ip=IP,
        port=25,
        code=451,
        reply="4.7.1 Greylisted, try again later",
    )
    outcome = classify(event)
    assert outcome.verdict is Verdict.TRANSIENT
    assert outcome.code == "4.7.1"
    assert outcome.title == "Greylisted, try again later"
    assert outcome.mail_flow is None
    assert outcome.reply == (
        "451 4.7.1 Greylisted, try again later "
        f"[LastAttemptedServerName={SERVER}] [LastAttemptedIP={IP}:25]"
    )


@pytest.mark.parametrize("stage", [Stage.MAIL, Stage.RCPT, Stage.DATA])
def test_a_remote_5xx_is_permanent_and_the_ndr_quotes_it(stage: Stage) -> None:
    event = WireEvent(
        stage,
        Failure.REPLY,
        "550 5.1.1 User unknown",
        server=SERVER,
        ip=IP,
        port=25,
        code=550,
        reply="5.1.1 User unknown",
    )
    outcome = classify(event)
    assert outcome.verdict is Verdict.PERMANENT
    assert outcome.permanent
    assert outcome.code == "5.1.1"
    assert outcome.title == "User unknown"
    assert outcome.final_reply == "550 5.1.1 User unknown"
    assert outcome.reply.startswith("550 5.1.1 User unknown [LastAttemptedServerName=")


def test_a_remote_reply_without_an_enhanced_code_gets_the_class_default() -> None:
    event = WireEvent(
        Stage.RCPT,
        Failure.REPLY,
        "550 no such user",
        server=SERVER,
        ip=IP,
        port=25,
        code=550,
        reply="no such user",
    )
    outcome = classify(event)
    assert outcome.permanent
    assert outcome.code == "5.0.0"
    assert outcome.final_reply == "550 no such user"


def test_a_multi_line_remote_reply_is_one_led_line() -> None:
    event = WireEvent(
        Stage.DATA,
        Failure.REPLY,
        "",
        server=SERVER,
        ip=IP,
        port=25,
        code=452,
        reply="4.3.1 Insufficient system storage\nTry again later",
    )
    outcome = classify(event)
    assert "\n" not in outcome.reply
    assert outcome.reply.startswith("452 4.3.1 Insufficient system storage Try again later")


@pytest.mark.parametrize(
    ("stage", "code", "reply"),
    [
        (Stage.GREETING, 421, "4.3.2 Service not available, closing transmission channel"),
        (Stage.EHLO, 554, "5.7.1 Go away"),
        (Stage.STARTTLS, 454, "4.7.0 TLS not available due to temporary reason"),
    ],
)
def test_an_error_before_mail_is_cannot_connect_with_the_reply_inside(
    stage: Stage, code: int, reply: str
) -> None:
    event = WireEvent(
        stage,
        Failure.REPLY,
        f"{code} {reply}",
        server=SERVER,
        ip=IP,
        port=2525,
        code=code,
        reply=reply,
    )
    outcome = classify(event)
    assert outcome.verdict is Verdict.TRANSIENT  # even a 5xx greeting: the server, not the user
    assert outcome.code == "4.4.317"
    assert outcome.title == "Cannot connect to remote server"
    assert outcome.reply == (
        f"450 4.4.317 Cannot connect to remote server [Message={code} {reply}] "
        f"[LastAttemptedServerName={SERVER}] [LastAttemptedIP={IP}:2525]"
    )


def test_a_recipient_domain_that_does_not_exist_fails_at_once() -> None:
    event = WireEvent(
        Stage.RESOLVE,
        Failure.DOMAIN_NXDOMAIN,
        "nosuch.test does not exist (NXDOMAIN)",
        server="nosuch.test",
    )
    outcome = classify(event)
    assert outcome.verdict is Verdict.PERMANENT
    assert outcome.code == "5.4.310"
    assert outcome.reply == "550 5.4.310 DNS domain nosuch.test does not exist"
    assert outcome.final_reply == outcome.reply
    assert outcome.ip is None


def test_unsendable_is_permanent_and_names_what_cannot_be_sent() -> None:
    event = WireEvent(
        Stage.RCPT, Failure.UNSENDABLE, "Invalid address: it holds a control character"
    )
    outcome = classify(event)
    assert outcome.permanent
    assert outcome.code == "5.1.3"
    assert outcome.reply == "550 5.1.3 Invalid address: it holds a control character"
    assert outcome.final_reply == outcome.reply
    sender = classify(WireEvent(Stage.MAIL, Failure.UNSENDABLE, "Invalid sender"))
    assert sender.code == "5.1.7" and sender.permanent


def test_internal_error_is_transient_with_its_reason() -> None:
    outcome = classify(WireEvent(Stage.DATA, Failure.INTERNAL, "ValueError: boom"))
    assert not outcome.permanent
    assert outcome.code == "4.3.0"
    assert outcome.reply == "451 4.3.0 Error: local error in processing (ValueError: boom)"


def test_a_reply_with_control_characters_or_bad_utf8_is_escaped() -> None:
    """aiosmtplib decodes replies with surrogateescape: a CR or a byte that is not UTF-8
    must reach neither the store nor an NDR as it came."""
    reply = "5.1.1 no such user\r\nX-Injected: yes \udcff"
    outcome = classify(
        WireEvent(Stage.RCPT, Failure.REPLY, f"550 {reply}", server=SERVER, code=550, reply=reply)
    )
    assert "\r" not in outcome.reply and "\udcff" not in outcome.reply
    assert outcome.final_reply == "550 5.1.1 no such user X-Injected: yes \\xff"
    outcome.reply.encode("utf-8")  # storable


@pytest.mark.parametrize(
    ("last_code", "line"),
    [
        ("4.4.316", "550 5.4.316 Message expired, connection refused"),
        ("4.4.312", "550 5.4.312 Message expired, DNS query failed"),
        ("4.7.1", "550 4.4.7 QUEUE.Expired; message expired"),  # a remote's code: no mail flow
        (None, "550 4.4.7 QUEUE.Expired; message expired"),  # never tried
    ],
)
def test_an_expiry_names_the_last_mail_flow_code(last_code: str | None, line: str) -> None:
    outcome = classify(expiry(last_code=last_code, server=SERVER, ip=f"{IP}:25"))
    assert outcome.permanent
    assert outcome.code == codes.status_of(line)
    assert outcome.title == "Message expired"
    assert outcome.reply == line
    assert outcome.final_reply == line
    assert outcome.mail_flow is None
    # The last attempt's server and LastAttemptedIP stay, as they were recorded.
    assert outcome.server == SERVER
    assert outcome.ip == f"{IP}:25"


def test_an_expiry_keeps_a_bracketed_ipv6_endpoint_and_no_server() -> None:
    assert classify(expiry(last_code=None, server=None, ip="[::1]:25")).ip == "[::1]:25"
    never = classify(expiry(last_code=None, server=None, ip=None))
    assert never.server is None and never.ip is None


def test_fix_now_not_found_is_exchanges_resolver_line() -> None:
    outcome = classify(not_found(server=SERVER, ip=f"{IP}:25"))
    assert outcome.permanent
    assert outcome.reply == RECIPIENT_NOT_FOUND
    assert outcome.reply == (
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
    )
    assert outcome.code == "5.1.10"
    assert outcome.title == "Recipient not found"
    assert outcome.final_reply == outcome.reply
    assert (outcome.server, outcome.ip) == (SERVER, f"{IP}:25")
