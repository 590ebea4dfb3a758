"""How the queue looks to people and scripts: the JSON shapes (a contract) and mailq-like tables."""

from __future__ import annotations

from typing import Any

from relay.clock import iso
from relay.store import Attempt, LastError, MessageRow, RecipientRow

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
    text = iso(timestamp)
    return text.replace("T", " ").removesuffix("Z") if text else "-"


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
            if r.last_error is not None and r.status.value != "delivered":
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
