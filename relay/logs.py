"""Log lines a Postfix admin can grep: one key=value line per step of a message, or the same
fields as one JSON object per line (`[log].format`), written from a thread of its own.

A `Line` is the message of a log record. It keeps the values as they were passed and is
rendered only when the logging thread writes it, so a line per delivery attempt costs the
event loop a small object and a LogRecord, never the formatting. Every value is escaped
(`relay.text.escaped`): addresses and replies come from clients and remote servers.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from relay.clock import iso
from relay.config import LogFormat
from relay.text import escaped

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIST_SHOWN = 20  # addresses of one list (a message's recipients) shown on a line
# Text that needs quotes in a key=value line: what would end the value or look like a key.
_NEEDS_QUOTES = frozenset(' "=\\')
_ADDRESS_KEYS = frozenset({"to", "from", "recipients"})


class Line:
    """One step of a message as fields, in the order given; None values are left out.

    `to` and `from` show as <address> (a list as <a>,<b>), `relay` (server, ip, port) as
    server[ip]:port, `delay` in seconds with one decimal, `next_attempt` as an ISO 8601
    time, and `reply` last, in parentheses after `status`, as Postfix writes it:
    `status=deferred (450 4.4.316 Connection refused ...)`.
    """

    __slots__ = ("fields",)

    def __init__(self, **fields: object) -> None:
        self.fields = fields

    def __str__(self) -> str:
        parts = []
        reply = None
        for key, value in self.fields.items():
            if value is None:
                continue
            if key == "reply":
                reply = value
                continue
            parts.append(f"{key}={_text(key, value)}")
        if reply is not None:
            parts.append(f"({_safe(str(reply))})")
        return " ".join(parts)

    def json_fields(self) -> dict[str, object]:
        """The fields as JSON values: addresses without the brackets, times in ISO 8601."""
        return {k: _json(k, v) for k, v in self.fields.items() if v is not None}


def _safe(text: str) -> str:
    """`escaped`, with the usual case (nothing unprintable: every UNSAFE character is) in
    one C call: this runs on the logging thread, which shares the GIL with the event loop."""
    return text if text.isprintable() else escaped(text)


def _relay(value: tuple[object, ...]) -> str:
    server, ip, port = value
    if ip is None:
        return _safe(str(server))
    return f"{_safe(str(server))}[{ip}]" + ("" if port is None else f":{port}")


def _addresses(value: object) -> str:
    if isinstance(value, str):
        return f"<{_safe(value)}>"
    return ",".join(f"<{_safe(a)}>" for a in _shown_list(value))


def _quoted(text: str) -> str:
    text = _safe(text)
    if text and text.isalnum():
        return text
    if not text or any(c in _NEEDS_QUOTES for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _text(key: str, value: object) -> str:
    if isinstance(value, str):
        return _addresses(value) if key in _ADDRESS_KEYS else _quoted(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if key == "delay":
            return f"{value:.1f}"
        if key == "next_attempt":
            return iso(value) or ""
        return str(value)
    if isinstance(value, int):
        return str(value)
    if key == "relay" and isinstance(value, tuple):
        return _relay(value)
    if key in _ADDRESS_KEYS:
        return _addresses(value)
    return _quoted(str(value))


def _json(key: str, value: object) -> object:
    if key == "relay" and isinstance(value, tuple):
        return _relay(value)
    if key in _ADDRESS_KEYS:
        shown = [_safe(a) for a in _shown_list(value)]
        return shown if not isinstance(value, str) else shown[0]
    if key == "delay" and isinstance(value, float):
        return round(value, 1)
    if key == "next_attempt" and isinstance(value, float):
        return iso(value)
    if isinstance(value, bool | int | float):
        return value
    return _safe(str(value))


def _shown_list(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
        return
    items = list(value) if isinstance(value, Iterable) else [value]
    for item in items[:LIST_SHOWN]:
        yield str(item)
    if len(items) > LIST_SHOWN:
        yield f"{len(items) - LIST_SHOWN} more"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC), level, logger, message (the text line), and
    a `Line`'s fields; a traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": escaped(record.getMessage()),
        }
        if isinstance(record.msg, Line):
            for key, value in record.msg.json_fields().items():
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def log_in_background(
    *, verbosity: int, format: LogFormat, stream: TextIO | None = None
) -> logging.handlers.QueueListener:
    """Log to `stream` (stderr) from a thread of its own: formatting and writing a line per
    message would otherwise be blocking work on the event loop.

    verbosity 0: INFO; 1 (`-v`): DEBUG, both directions of every SMTP session (aiosmtpd's
    `mail.log` inbound, `relay.delivery` outbound), but never aiosqlite's SQL; 2 (`-vv`):
    every library's debug output as well.
    """
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    formatter = JsonFormatter() if format is LogFormat.JSON else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    # What the format above does not show is not collected (the logging HOWTO's
    # "Optimization" section): no caller's frame, thread, process or task name per record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # Python >= 3.12
    root = logging.getLogger()
    root.addHandler(_HandToThread(records))
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    if verbosity == 0:
        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command log
    if verbosity < 2:
        # aiosqlite logs every statement at DEBUG (a PRAGMA data_version each second).
        logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    listener = logging.handlers.QueueListener(records, handler)
    listener.start()
    return listener


class _HandToThread(logging.Handler):
    """Puts each record on the logging thread's queue as it is. QueueHandler would also
    format and copy it here, on the event loop, which is the work the thread is for; the
    relay's log arguments are numbers, strings and `Line`s of them, so nothing changes
    before it is written."""

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord]) -> None:
        super().__init__()
        self._put = records.put

    def handle(self, record: logging.LogRecord) -> bool:  # no lock: the queue is thread-safe
        self._put(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self._put(record)
