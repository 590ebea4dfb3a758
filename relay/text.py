"""Text from the wire made safe for headers, file names and log lines.

Pure. A CR, an LF or a NUL that a client or a remote server sent must never start a header
line, a log line or a path of its own (issue 10): `printable` replaces what is unsafe,
`escaped` shows it as an escape.
"""

from __future__ import annotations

import re

# What no envelope field may hold: C0 controls (CR, LF, NUL...), DEL, C1 controls, the
# Unicode line and paragraph separators, and lone surrogates, which is how aiosmtpd's
# surrogateescape decoding of a command line shows bytes that are not UTF-8. Any of them in
# a header, a file name or a log line could start a line of its own.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: str, replacement: str = "?") -> str:
    """`text` with every UNSAFE character replaced, as Postfix's printable() does."""
    return UNSAFE.sub(replacement, text) if UNSAFE.search(text) else text


def escaped(text: str) -> str:
    """`text` with every UNSAFE character written as an escape (for log lines): \\x0d for a
    CR, and an undecodable byte as the \\xNN it was on the wire."""
    return UNSAFE.sub(_escape, text) if UNSAFE.search(text) else text


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte code - 0xDC00
        code -= 0xDC00
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
