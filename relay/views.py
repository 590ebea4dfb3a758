"""How the queue looks to people and scripts: the JSON shapes (a contract) and mailq-like tables."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from relay.clock import iso
from relay.mailbox_reader import MailboxEntry, Rendered
from relay.spool.rows import Attempt, LastError, MessageRow, RecipientRow
from relay.states import UNFINISHED, Status

# Prose (an alert's how to fix) is wrapped to this width when stdout is not a terminal.
PROSE_WIDTH = 100


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


def fit(line: str, width: int | None, *, indent: int) -> list[str]:
    """A line as it fits `width` (None: as it is, for a pipe): longer lines wrap at spaces,
    continuing under `indent`. Nothing is cut: a word goes whole to the next line, and only
    a word wider than the terminal itself is split across lines."""
    if width is None or len(line) <= width:
        return [line]
    return textwrap.wrap(
        line,
        width,
        subsequent_indent=" " * indent,
        break_on_hyphens=False,
    )


@dataclass(frozen=True, slots=True)
class _Layout:
    """A table whose first column is a name of any length (a route, a connector: up to 64
    characters, shown whole). When a row would not fit the terminal, every name goes on a
    line of its own with the other columns under it, so the columns still line up."""

    name_width: int
    stacked: bool
    width: int | None

    @classmethod
    def of(cls, pairs: list[tuple[str, str]], width: int | None) -> _Layout:
        name_width = max(len(name) for name, _ in pairs)
        widest = max(name_width + 1 + len(rest) for _, rest in pairs)
        return cls(name_width, width is not None and widest > width, width)

    def row(self, name: str, rest: str) -> list[str]:
        if not self.stacked:
            return [f"{name:<{self.name_width}} {rest}"]
        return [*fit(name, self.width, indent=2), *fit(f"  {rest}", self.width, indent=4)]


def short_time(timestamp: float | None) -> str:
    """The one time format for people: UTC with the date, `2026-12-04 04:48:46Z` ("-" for
    none). JSON keeps ISO 8601 (`relay.clock.iso`)."""
    text = iso(timestamp)
    return text.replace("T", " ") if text else "-"


def relative(timestamp: float, now: float) -> str:
    """How far a time is from now, roughly, for people: `in 4m`, `2h ago`, `in 47h`, `now`.
    A unit is used up to twice the next one (90s, 90m, 48h), so expiry reads in hours as
    Exchange states it."""
    delta = timestamp - now
    seconds = abs(delta)
    if seconds < 1:
        return "now"
    if seconds < 90:
        amount = f"{int(seconds)}s"
    elif seconds < 90 * 60:
        amount = f"{int(seconds // 60)}m"
    elif seconds < 48 * 3600:
        amount = f"{int(seconds // 3600)}h"
    else:
        amount = f"{int(seconds // 86400)}d"
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


def queue_table(
    messages: list[MessageRow],
    *,
    now: float,
    width: int | None = None,
    clock_note: str = "",
    empty: str = "Mail queue is empty",
) -> str:
    """A mailq-like listing: one line per message, one per recipient under it, then detail
    lines (the last error, the next retry) wrapped to `width` (None: never wrapped)."""
    if not messages:
        return "\n".join([empty, *([f"-- {clock_note}"] if clock_note else [])])
    route_width = max(len(r.connector or "-") for m in messages for r in m.recipients)
    lines = [f"{'ID':<8} {'SIZE':>7}  {'RECEIVED':<20}  SENDER / RECIPIENT"]
    counts: dict[str, int] = {}
    recipients = 0
    for message in messages:
        unfinished = any(r.status in UNFINISHED for r in message.recipients)
        queued = f"  (queued {relative(message.received_at, now)})" if unfinished else ""
        lines += fit(
            f"{message.id:<8} {human_size(message.size):>7}  {short_time(message.received_at)}  "
            f"{message.mail_from or '<>'}{queued}",
            width,
            indent=40,
        )
        if message.subject:
            lines += fit(" " * 40 + f"Subject: {message.subject}", width, indent=40)
        for r in message.recipients:
            recipients += 1
            counts[r.status.value] = counts.get(r.status.value, 0) + 1
            lines += _recipient_lines(r, now=now, width=width, route_width=route_width)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    noun = "message" if len(messages) == 1 else "messages"
    lines.append(
        f"-- {len(messages)} {noun}, {recipients} recipient{'s' if recipients != 1 else ''}"
        + (f" ({summary})" if summary else "")
    )
    if clock_note:
        lines += fit(f"-- {clock_note}", width, indent=3)
    return "\n".join(lines)


def _recipient_lines(
    r: RecipientRow, *, now: float, width: int | None, route_width: int
) -> list[str]:
    """A recipient's line (state, route, address) and its detail lines. When the line does
    not fit, the route moves to a detail line of its own, whole."""
    state = f"{r.status.value} x{r.attempts}" if r.attempts else r.status.value
    route = r.connector or "-"
    line = f"{'':8} {state:<13} {route:<{route_width}}  {r.address}"
    lines = [line]
    if width is not None and len(line) > width:
        lines = [*fit(f"{'':8} {state:<13} {r.address}", width, indent=11)]
        lines += fit(f"{'':11}via {route}", width, indent=15)
    if r.last_error is not None and r.status is not Status.DELIVERED:
        lines += fit(f"{'':11}({r.last_error.reply})", width, indent=12)
    if r.next_attempt_at is not None:
        lines += fit(
            f"{'':11}next retry {relative(r.next_attempt_at, now)} "
            f"({short_time(r.next_attempt_at)}), expires {relative(r.expires_at, now)} "
            f"({short_time(r.expires_at)})",
            width,
            indent=11,
        )
    return lines


def message_detail(message: MessageRow, *, now: float, width: int | None = None) -> str:
    """`relay queue show`: the envelope, each recipient and its attempt history."""
    lines = [
        f"Queue ID:     {message.id}",
        f"Message-ID:   {message.message_id}",
        f"From:         {message.mail_from or '<>'}",
        f"Subject:      {message.subject}",
        f"Size:         {message.size} bytes",
        f"Received:     {_when(message.received_at, now)} from {message.client_helo or '?'} "
        f"[{message.client_address}]",
    ]
    for r in message.recipients:
        lines += [
            "",
            f"Recipient:    {r.address}",
            f"  Status:     {r.status.value}",
            f"  Route:      {r.connector or '-'}",
            f"  Attempts:   {r.attempts}",
            f"  Next try:   {_when(r.next_attempt_at, now)}",
            f"  Expires:    {_when(r.expires_at, now)}",
        ]
        if r.delivered_at is not None:
            lines.append(f"  Delivered:  {_when(r.delivered_at, now)}")
        if r.last_error is not None:
            lines += fit(f"  Last error: {r.last_error.reply}", width, indent=14)
        if r.history:
            lines.append("  History:")
            for attempt in r.history:
                lines += fit(f"    {short_time(attempt.at)}  {attempt.reply}", width, indent=26)
    return "\n".join(part for line in lines for part in fit(line, width, indent=14))


def _when(timestamp: float | None, now: float) -> str:
    """A time for people with how far it is from now: `2026-12-04 04:48:46Z (in 4m)`."""
    if timestamp is None:
        return "-"
    return f"{short_time(timestamp)} ({relative(timestamp, now)})"


def _iso_when(text: str | None, now: float) -> str:
    """`_when` for a time that is already JSON (the digest's and alerts' shapes)."""
    if not text:
        return "-"
    return _when(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp(), now)


def digest_table(
    rows: list[dict[str, Any]],
    *,
    now: float,
    width: int | None = None,
    clock_note: str = "",
    empty: str = "Nothing pending",
) -> str:
    """`relay queue digest`: one line per route and last error, then its times and that
    error in full on detail lines."""
    pairs = [
        (
            row["connector"] or "-",
            f"{row['status']:<9} {row['messages']:>5} {row['code'] or '-':<8} {row['ip'] or '-'}",
        )
        for row in rows
    ]
    head = ("ROUTE", f"{'STATUS':<9} {'MSGS':>5} {'CODE':<8} LAST IP")
    layout = _Layout.of([head, *pairs], width)
    lines = layout.row(*head)
    for row, pair in zip(rows, pairs, strict=True):
        lines += layout.row(*pair)
        lines += fit(
            f"    started {_iso_when(row['queue_started_at'], now)}, "
            f"next retry {_iso_when(row['next_retry_at'], now)}, "
            f"oldest expires {_iso_when(row['oldest_expires_at'], now)}",
            width,
            indent=4,
        )
        if row["last_error"]:
            lines += fit("    " + row["last_error"], width, indent=6)
    if not rows:
        lines.append(empty)
    if clock_note:
        lines += fit(f"-- {clock_note}", width, indent=3)
    return "\n".join(lines)


def alerts_table(alerts: list[dict[str, Any]], *, now: float, width: int | None = None) -> str:
    if not alerts:
        return "No mail flow alerts: no connector has mail deferred with a mail flow code."
    blocks = []
    for a in alerts:
        command = f'relay alerts fix-now "{a["connector"]}"'
        # On a line of its own, never wrapped, so it can be copied whatever the connector's name.
        fix = ["  Fix now available:", f"    {command}"] if a["fix_now"] else []
        blocks.append(
            "\n".join(
                [
                    *fit(f"{a['connector']}: {a['code']} {a['title']}", width, indent=2),
                    *fix,
                    "  Queued messages:    " + str(a["queued"]),  # a count, not a status
                    f"  Queue started:      {_iso_when(a['queue_started_at'], now)}",
                    f"  Oldest expires:     {_iso_when(a['oldest_expires_at'], now)}",
                    f"  Destination server: {a['server'] or '-'}",
                    f"  Last IP address:    {a['ip'] or '-'}",
                    *fit("  Last error:         " + a["last_error"], width, indent=22),
                    "  Notified:           "
                    + (_iso_when(a["notified_at"], now) if a["notified_at"] else "not yet"),
                    "  How to fix:",
                    *_wrap(a["how_to_fix"], indent=4, width=width),
                ]
            )
        )
    return "\n\n".join(blocks)


def _wrap(text: str, *, indent: int, width: int | None) -> list[str]:
    """Prose (how to fix) wrapped to the terminal, or to 100 columns for a pipe: it is
    read, not parsed, and wrapping at spaces cuts nothing."""
    return textwrap.wrap(
        text,
        width or PROSE_WIDTH,
        initial_indent=" " * indent,
        subsequent_indent=" " * indent,
        break_long_words=False,
    )


def domains_table(domains: list[dict[str, Any]], *, width: int | None = None) -> str:
    pairs = [
        (
            d["name"],
            f"{d['type'] + (' *' if d['changed'] else ''):<15} {d['config_type']:<15} "
            + (", ".join(d["mailboxes"]) or "-"),
        )
        for d in domains
    ]
    head = ("DOMAIN", f"{'TYPE':<15} {'CONFIG FILE':<15} MAILBOXES")
    layout = _Layout.of([head, *pairs], width)
    lines = [line for pair in (head, *pairs) for line in layout.row(*pair)]
    if any(d["changed"] for d in domains):
        lines += fit(
            "-- * changed at run time; `relay domain reset` returns to the config file",
            width,
            indent=3,
        )
    return "\n".join(lines)


def connectors_table(connectors: list[dict[str, Any]], *, width: int | None = None) -> str:
    pairs = []
    for c in connectors:
        enabled = ("yes" if c["enabled"] else "no") + (" *" if c["changed"] else "")
        config = "yes" if c["config_enabled"] else "no"
        pairs.append(
            (
                c["name"],
                f"{c['type']:<11} {enabled:<8} {config:<7} {c['tls']:<22} {c['destination']}",
            )
        )
    head = ("CONNECTOR", f"{'TYPE':<11} {'ENABLED':<8} {'CONFIG':<7} {'TLS':<22} DESTINATION")
    layout = _Layout.of([head, *pairs], width)
    lines = layout.row(*head)
    for c, pair in zip(connectors, pairs, strict=True):
        lines += layout.row(*pair)
        lines += fit("    for " + ", ".join(c["recipient_domains"]), width, indent=8)
    if any(c["changed"] for c in connectors):
        lines.append("-- * changed at run time; `relay connector reset` returns to the config file")
    return "\n".join(lines)
