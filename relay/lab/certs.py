"""Throwaway certificate authorities for the lab's TLS peers (built on trustme)."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import trustme

# An expired certificate must be unambiguously expired on any machine clock
# skew we care about, so both dates lie well in the past.
_EXPIRED_NOT_BEFORE = dt.timedelta(days=60)
_EXPIRED_NOT_AFTER = dt.timedelta(days=30)


class LabCA:
    """One certificate authority: issues server certificates and writes its own PEM.

    The lab trusts exactly one of these (its PEM is the connectors' `ca_file`);
    a second instance that is never written out plays the "unknown CA".
    """

    def __init__(self, *, organization: str = "mailflow-relay lab CA") -> None:
        self._ca = trustme.CA(organization_name=organization)

    def write_ca_file(self, directory: Path, *, filename: str = "lab-ca.pem") -> Path:
        """Write the CA certificate (PEM) into `directory` and return its absolute path."""
        directory.mkdir(parents=True, exist_ok=True)
        path = (directory / filename).resolve()
        self._ca.cert_pem.write_to_path(str(path))
        return path

    def server_context(self, name: str, *, expired: bool = False) -> ssl.SSLContext:
        """A server-side TLS context presenting a certificate for `name` signed by this CA."""
        not_before = not_after = None
        if expired:
            now = dt.datetime.now(dt.UTC)
            not_before, not_after = now - _EXPIRED_NOT_BEFORE, now - _EXPIRED_NOT_AFTER
        leaf = self._ca.issue_cert(name, not_before=not_before, not_after=not_after)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client-side context that trusts only this CA and checks names (for tests)."""
        # PROTOCOL_TLS_CLIENT verifies chain and name but loads no system CAs.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._ca.configure_trust(context)
        return context
