"""Header fields the relay writes itself: dates (RFC 5322 section 3.3), shared by the
intake's Received: header and the messages the relay builds (NDRs, alerts).
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from email.utils import format_datetime


def rfc5322_date(timestamp: float) -> str:
    """ "Fri, 27 Nov 2026 05:26:32 +0000": UTC written as +0000, not the "unknown" -0000."""
    return _date_of_second(int(timestamp))


@functools.lru_cache(maxsize=8)
def _date_of_second(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))
