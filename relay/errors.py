"""The relay's exceptions: one root, so the CLI and `relay serve` catch them in one place.

As in aiosmtplib, an error that resembles a built-in one also inherits it, so callers that
only know the built-in still catch it.
"""

from __future__ import annotations


class RelayError(Exception):
    """Something the relay cannot do; the message says what and what to change."""


class StoreError(RelayError):
    """The spool could not do what was asked (disk full, locked, corrupt, ...)."""
