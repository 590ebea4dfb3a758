"""How the queue looks to people and scripts: the JSON shapes (a contract) and mailq-like tables."""

from __future__ import annotations

from typing import Any

from relay.clock import iso
from relay.mailbox_reader import MailboxEntry, Rendered
from relay.spool.rows import Attempt, LastError, MessageRow, RecipientRow
from relay.states import Status

WIDTH = 100


def last_error_json(error: LastError | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {
        "code": error.code,
        "reply": error.reply,
        "title": error.title,
        "server": error.server,
        "ip": error.ip,
        "at": iso(error.at),
    }


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    return {
        "at": iso(attempt.at),
        "code": attempt.code,
        "reply": attempt.reply,
        "server": attempt.server,
        "ip": attempt.ip,
    }


def recipient_json(recipient: RecipientRow, *, history: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "address": recipient.address,
        "status": recipient.status.value,
        "connector": recipient.connector,
        "attempts": recipient.attempts,
        "next_attempt_at": iso(recipient.next_attempt_at),
        "expires_at": iso(recipient.expires_at),
        "delivered_at": iso(recipient.delivered_at),
        "last_error": last_error_json(recipient.last_error),
    }
    if history:
        data["history"] = [attempt_json(a) for a in recipient.history]
    return data


def message_json(message: MessageRow, *, history: bool = False) -> dict[str, Any]:
    return {
        "id": message.id,
        "message_id": message.message_id,
        "mail_from": message.mail_from,
        "subject": message.subject,
        "size": message.size,
        "received_at": iso(message.received_at),
        "recipients": [recipient_json(r, history=history) for r in message.recipients],
    }


def human_size(size: int) -> str:
    for unit, factor in (("M", 1000**2), ("K", 1000)):
        if size >= factor:
            return f"{size / factor:.1f}{unit}"
    return f"{size}B"


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def short_time(timestamp: float | None) -> str:
    """The one time format for people: UTC with the date, `2026-12-04 04:48:46Z` ("-" for
    none). JSON keeps ISO 8601 (`relay.clock.iso`)."""
    text = iso(timestamp)
    return text.replace("T", " ") if text else "-"


def relative(timestamp: float, now: float) -> str:
    """How far a time is from now, roughly, for people: `in 4m`, `2h ago`, `now`."""
    delta = timestamp - now
    seconds = abs(delta)
    if seconds < 1:
        return "now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            amount = f"{int(seconds // size)}{unit}"
            break
    return f"in {amount}" if delta > 0 else f"{amount} ago"


def mailbox_table(entries: list[MailboxEntry]) -> str:
    """`relay mailbox list`: one line per message, N first (what `mailbox show` takes)."""
    lines = [f"{'N':>4}  {'DATE (UTC)':<20}  {'SIZE':>7}  FROM / SUBJECT"]
    address = None
    for e in entries:
        if e.address != address:
            address = e.address
            lines.append(f"{address}:")
        lines.append(f"{e.n:>4}  {short_time(e.date):<20}  {human_size(e.size):>7}  {e.mail_from}")
        lines.append(f"{'':36}{e.subject}")
    return "\n".join(lines)


def mailbox_detail(message: Rendered) -> str:
    """`relay mailbox show`: the summary, the text parts and, for an NDR or DSN, its
    delivery-status fields per recipient."""
    e = message.entry
    lines = [
        f"Mailbox:  {e.address} #{e.n}",
        f"File:     {e.file}",
        f"Date:     {short_time(e.date)}",
        f"From:     {e.mail_from}",
        f"To:       {message.to}",
        f"Subject:  {e.subject}",
        "",
        message.text,
    ]
    if message.delivery_status is not None:
        lines += ["", "Delivery status:"]
        for block in message.delivery_status:
            lines.append("")
            lines += [f"  {field + ':':<17} {value}" for field, value in block.items()]
    return "\n".join(lines)


def queue_table(messages: list[MessageRow], *, clock_note: str = "") -> str:
    """A mailq-like listing: one line per message, one per recipient under it."""
    lines = [f"{'ID':<8} {'SIZE':>7}  {'RECEIVED (UTC)':<19}  SENDER / RECIPIENT"]
    counts: dict[str, int] = {}
    recipients = 0
    for message in messages:
        sender = message.mail_from or "<>"
        lines.append(
            f"{message.id:<8} {human_size(message.size):>7}  {short_time(message.received_at)}  "
            + clip(sender, WIDTH - 40)
        )
        if message.subject:
            lines.append(" " * 39 + clip(f"Subject: {message.subject}", WIDTH - 39))
        for r in message.recipients:
            recipients += 1
            counts[r.status.value] = counts.get(r.status.value, 0) + 1
            state = f"{r.status.value} x{r.attempts}" if r.attempts else r.status.value
            route = clip(r.connector or "-", 18)
            lines.append(f"{'':8} {state:<13} {route:<18}  " + clip(r.address, WIDTH - 43))
            if r.last_error is not None and r.status is not Status.DELIVERED:
                lines.append(" " * 11 + clip(f"({r.last_error.reply})", WIDTH - 11))
            if r.next_attempt_at is not None:
                lines.append(
                    " " * 11 + f"next attempt {short_time(r.next_attempt_at)}, "
                    f"expires {short_time(r.expires_at)}"
                )
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    noun = "message" if len(messages) == 1 else "messages"
    lines.append(
        f"-- {len(messages)} {noun}, {recipients} recipient{'s' if recipients != 1 else ''}"
        + (f" ({summary})" if summary else "")
    )
    if clock_note:
        lines.append(f"-- {clock_note}")
    return "\n".join(lines)


def message_detail(message: MessageRow) -> str:
    """`relay queue show`: the envelope, each recipient and its attempt history."""
    lines = [
        f"Queue ID:     {message.id}",
        f"Message-ID:   {message.message_id}",
        f"From:         {message.mail_from or '<>'}",
        f"Subject:      {message.subject}",
        f"Size:         {message.size} bytes",
        f"Received:     {iso(message.received_at)} from {message.client_helo or '?'} "
        f"[{message.client_address}]",
    ]
    for r in message.recipients:
        lines += [
            "",
            f"Recipient:    {r.address}",
            f"  Status:     {r.status.value}",
            f"  Route:      {r.connector or '-'}",
            f"  Attempts:   {r.attempts}",
            f"  Next try:   {iso(r.next_attempt_at) or '-'}",
            f"  Expires:    {iso(r.expires_at)}",
        ]
        if r.delivered_at is not None:
            lines.append(f"  Delivered:  {iso(r.delivered_at)}")
        if r.last_error is not None:
            lines.append(f"  Last error: {r.last_error.reply}")
        if r.history:
            lines.append("  History:")
            lines += [f"    {iso(a.at)}  {a.reply}" for a in r.history]
    return "\n".join(lines)


def _time(text: str | None) -> str:
    return text.replace("T", " ").removesuffix("Z")[5:16] if text else "-"


def digest_table(rows: list[dict[str, Any]], *, clock_note: str = "") -> str:
    """`relay queue digest`: one line per route and last error, then that error in full."""
    lines = [
        f"{'ROUTE':<18} {'STATUS':<9} {'MSGS':>5} {'CODE':<8} {'STARTED':<11} "
        f"{'NEXT RETRY':<11} {'EXPIRES':<11} LAST IP"
    ]
    for row in rows:
        lines.append(
            f"{clip(row['connector'] or '-', 18):<18} {row['status']:<9} {row['messages']:>5} "
            f"{row['code'] or '-':<8} {_time(row['queue_started_at']):<11} "
            f"{_time(row['next_retry_at']):<11} {_time(row['oldest_expires_at']):<11} "
            + clip(row["ip"] or "-", WIDTH - 80)
        )
        if row["last_error"]:
            lines.append("    " + clip(row["last_error"], WIDTH - 4))
    if not rows:
        lines.append("(the queue holds nothing pending)")
    lines.append("-- times are UTC (MM-DD HH:MM)")
    if clock_note:
        lines.append(f"-- {clock_note}")
    return "\n".join(lines)


def alerts_table(alerts: list[dict[str, Any]]) -> str:
    if not alerts:
        return "No mail flow alerts: no connector has mail deferred with a mail flow code."
    blocks = []
    for a in alerts:
        command = f'relay alerts fix-now "{a["connector"]}"'
        # On a line of its own, unclipped, so it can be copied whatever the connector's name.
        fix = ["  Fix now available:", f"    {command}"] if a["fix_now"] else []
        blocks.append(
            "\n".join(
                [
                    clip(f"{a['connector']}: {a['code']} {a['title']}", WIDTH),
                    *fix,
                    "  Queued messages:    " + str(a["queued"]),  # a count, not a status
                    f"  Queue started:      {a['queue_started_at']}",
                    f"  Oldest expires:     {a['oldest_expires_at']}",
                    f"  Destination server: {a['server'] or '-'}",
                    f"  Last IP address:    {a['ip'] or '-'}",
                    "  Last error:         " + clip(a["last_error"], WIDTH - 22),
                    f"  Notified:           {a['notified_at'] or 'not yet'}",
                    "  How to fix:",
                    *_wrap(a["how_to_fix"], indent=4),
                ]
            )
        )
    return "\n\n".join(blocks)


def _wrap(text: str, *, indent: int) -> list[str]:
    import textwrap

    return textwrap.wrap(
        text, WIDTH - indent, initial_indent=" " * indent, subsequent_indent=" " * indent
    )


def domains_table(domains: list[dict[str, Any]]) -> str:
    lines = [f"{'DOMAIN':<32} {'TYPE':<15} {'CONFIG FILE':<15} MAILBOXES"]
    for d in domains:
        changed = " *" if d["changed"] else ""
        lines.append(
            f"{clip(d['name'], 32):<32} {d['type'] + changed:<15} {d['config_type']:<15} "
            + clip(", ".join(d["mailboxes"]) or "-", WIDTH - 65)
        )
    if any(d["changed"] for d in domains):
        lines.append("-- * changed at run time; `relay domain reset` returns to the config file")
    return "\n".join(lines)


def connectors_table(connectors: list[dict[str, Any]]) -> str:
    lines = [f"{'CONNECTOR':<24} {'TYPE':<11} {'ENABLED':<8} {'CONFIG':<7} {'TLS':<22} DESTINATION"]
    for c in connectors:
        enabled = ("yes" if c["enabled"] else "no") + (" *" if c["changed"] else "")
        lines.append(
            f"{clip(c['name'], 24):<24} {c['type']:<11} {enabled:<8} "
            f"{'yes' if c['config_enabled'] else 'no':<7} {c['tls']:<22} "
            + clip(c["destination"], WIDTH - 76)
        )
        lines.append("    for " + clip(", ".join(c["recipient_domains"]), WIDTH - 8))
    if any(c["changed"] for c in connectors):
        lines.append("-- * changed at run time; `relay connector reset` returns to the config file")
    return "\n".join(lines)
