"""The helpers that decide whether a test that needs a program runs, skips or fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import SWAKS_TLS_PACKAGES, require_swaks_tls

WITHOUT_TLS = """\
=== AUTH CRAM-MD5 supported
*** IPv6 not available: requires IO::Socket::INET6
*** TLS not available: requires Net::SSLeay
"""
WITH_TLS = "=== Socket Transport supported\n=== TLS supported\n"


def _fake_swaks(directory: Path, support: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `swaks` first on PATH whose --support prints `support`, as swaks 20201014 does."""
    directory.mkdir(parents=True, exist_ok=True)
    program = directory / "swaks"
    program.write_text(f"#!/bin/sh\ncat <<'EOF'\n{support}EOF\n", "utf-8")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return program


def test_swaks_with_tls_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    program = _fake_swaks(tmp_path / "bin", WITH_TLS, monkeypatch)
    assert require_swaks_tls() == str(program)


def test_swaks_without_tls_skips_naming_the_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_swaks(tmp_path / "bin", WITHOUT_TLS, monkeypatch)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as caught:
        require_swaks_tls()
    assert SWAKS_TLS_PACKAGES in str(caught.value)
    assert "TLS not available: requires Net::SSLeay" in str(caught.value)


def test_swaks_without_tls_fails_in_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_swaks(tmp_path / "bin", WITHOUT_TLS, monkeypatch)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="libnet-ssleay-perl libio-socket-ssl-perl"):
        require_swaks_tls()
