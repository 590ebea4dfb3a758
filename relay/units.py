"""Parsing of the config's human units: durations ("48h", "15m", "30s") and sizes ("35MB")."""

from __future__ import annotations

import re

from relay.errors import UnitError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
# Exchange Online states its limits in decimal megabytes (35 MB message size), so KB/MB/GB
# are powers of 1000; KiB/MiB/GiB are there for those who want the binary ones.
_SIZE_BYTES = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as "48h", "15m", "30s", "7d" or "250ms"."""
    match = _DURATION.match(text)
    if match is None:
        raise UnitError(
            f"{text!r} is not a duration; write a number and a unit (ms, s, m, h, d), like '15m'"
        )
    return float(match.group(1)) * _DURATION_SECONDS[match.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest exact way to write a duration: 172800 → "48h", 90 → "90s"."""
    if seconds >= 1 and seconds == int(seconds):
        whole = int(seconds)
        # Hours up to a week, as Exchange states its 48-hour expiry; days beyond.
        units = (
            (("d", 86400), ("h", 3600), ("m", 60))
            if whole >= 7 * 86400
            else (
                ("h", 3600),
                ("m", 60),
            )
        )
        for unit, size in units:
            if whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def parse_size(text: str) -> int:
    """Bytes in a size such as "35MB", "512KiB" or "1000"."""
    match = _SIZE.match(text)
    if match is None:
        raise UnitError(
            f"{text!r} is not a size; write a number and a unit (B, KB, MB, GB), like '35MB'"
        )
    unit = (match.group(2) or "b").lower()
    return int(float(match.group(1)) * _SIZE_BYTES[unit])


def format_size(size: int) -> str:
    """A size the way the config writes it: 35000000 → "35MB"."""
    for unit, factor in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
