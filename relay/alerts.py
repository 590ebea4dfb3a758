"""Mail flow alerts: Exchange Online's "Messages have been delayed" view and notification.

One alert per connector whose queue holds mail deferred with a mail flow intelligence code,
with the seed's guidance for that code and the Fix now flag (4.4.316 on an on-premises
connector). `due_notifications` decides, purely, which alerts cross the configured threshold;
`build_notification` writes the e-mail to the admins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid
from typing import Any

from relay import codes
from relay.clock import iso, to_datetime
from relay.config import AlertsConfig, ConnectorType
from relay.policy import Policy
from relay.spool.rows import DigestRow, LastError
from relay.spool.settings import ALERT_NOTIFIED, Stored


@dataclass(frozen=True, slots=True)
class Alert:
    connector: str
    code: str
    title: str
    queued: int  # messages deferred on this connector
    queue_started_at: float
    oldest_expires_at: float
    last_error: LastError
    how_to_fix: str
    fix_now: bool
    notified_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "connector": self.connector,
            "code": self.code,
            "title": self.title,
            "queued": self.queued,
            "queue_started_at": iso(self.queue_started_at),
            "oldest_expires_at": iso(self.oldest_expires_at),
            "server": self.last_error.server,
            "ip": self.last_error.ip,
            "last_error": self.last_error.reply,
            "how_to_fix": self.how_to_fix,
            "fix_now": self.fix_now,
            "notified_at": iso(self.notified_at),
        }


def alerts(
    digest: Sequence[DigestRow], policy: Policy, notified: Stored | None = None
) -> list[Alert]:
    """The current alerts, oldest queue first, from the queue digest; `notified` is the
    spool's ALERT_NOTIFIED settings (when each connector's episode was notified)."""
    notified = notified or {}
    connectors = {c.name: c for c in policy.connectors}
    groups: dict[str, list[DigestRow]] = {}
    for row in digest:
        if row.connector in connectors and row.deferred and row.code in codes.CODES:
            groups.setdefault(row.connector, []).append(row)
    result = []
    for name, rows in groups.items():
        latest = max(rows, key=lambda r: r.last_error.at if r.last_error else 0.0)
        assert latest.last_error is not None and latest.code is not None
        mail_flow = codes.CODES[latest.code]
        on_premises = connectors[name].type is ConnectorType.ON_PREMISES
        result.append(
            Alert(
                connector=name,
                code=mail_flow.code,
                title=mail_flow.title,
                queued=sum(r.messages for r in rows),
                queue_started_at=min(r.queue_started_at for r in rows),
                oldest_expires_at=min(r.oldest_expires_at for r in rows),
                last_error=latest.last_error,
                how_to_fix=mail_flow.how_to_fix,
                # The seed: Fix now is offered for 4.4.316 towards on-premises.
                fix_now=mail_flow is codes.CONNECTION_REFUSED and on_premises,
                notified_at=ALERT_NOTIFIED(name).read(notified),
            )
        )
    return sorted(result, key=lambda a: a.queue_started_at)


def due_notifications(current: Sequence[Alert], settings: AlertsConfig, now: float) -> list[Alert]:
    """Alerts past the threshold (count and age) not yet notified in this episode."""
    return [
        a
        for a in current
        if a.notified_at is None
        and a.queued >= settings.threshold
        and now - a.queue_started_at > settings.after
    ]


def next_deadline(
    current: Sequence[Alert], settings: AlertsConfig, *, exclude: Sequence[Alert] = ()
) -> float | None:
    """When the next alert over the count threshold becomes old enough to notify."""
    sent = {a.connector for a in exclude}
    times = [
        a.queue_started_at + settings.after
        for a in current
        if a.notified_at is None and a.queued >= settings.threshold and a.connector not in sent
    ]
    return min(times, default=None)


def build_notification(
    alert: Alert, *, to: Sequence[str], postmaster: str, hostname: str, now: float
) -> bytes:
    """Our own "Messages have been delayed" e-mail to the tenant's admins."""
    # Long subjects are folded after their first words, not right after "Subject:".
    message = EmailMessage(policy=SMTP.clone(max_line_length=998))
    message["From"] = postmaster
    message["To"] = ", ".join(to)
    message["Subject"] = (
        f"Messages have been delayed: {alert.connector} ({alert.code} {alert.title})"
    )
    message["Date"] = to_datetime(now).strftime("%a, %d %b %Y %H:%M:%S +0000")
    message["Message-ID"] = make_msgid(domain=hostname)
    message["Auto-Submitted"] = "auto-generated"
    lines = [
        f'Messages to the connector "{alert.connector}" have been delayed.',
        "",
        f"{alert.queued} message(s) are queued and waiting to be retried.",
        "",
        f"Error:               {alert.code} {alert.title}",
        f"Last error:          {alert.last_error.reply}",
        f"Destination server:  {alert.last_error.server or '-'}",
        f"Last IP address:     {alert.last_error.ip or '-'}",
        f"Queue started:       {iso(alert.queue_started_at)}",
        f"Oldest expires:      {iso(alert.oldest_expires_at)} (then the senders get an NDR)",
        "",
        "How to fix it:",
        alert.how_to_fix,
    ]
    if alert.fix_now:
        lines += [
            "",
            "Fix now is available: if no more mail should go on-premises, run",
            f'  relay alerts fix-now "{alert.connector}"',
            "so mail to addresses that do not exist is rejected at once.",
        ]
    lines += ["", f"Generated by {hostname}. See the queue with `relay queue digest`."]
    message.set_content("\n".join(lines) + "\n")
    return message.as_bytes()
