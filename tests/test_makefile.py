"""Issue 12, section 6: `make run` reinstalls only when pyproject.toml changed.

`make -n` (print, do not run) against a venv of the test's own (VENV=...), so the
project's .venv is neither used nor touched."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.helpers import REPO, require_program


def _planned(venv: Path, target: str) -> str:
    done = subprocess.run(
        # --no-print-directory: under `make test` this make is a sub-make, which would
        # otherwise print "Entering directory" lines around the plan.
        [require_program("make"), "-n", "--no-print-directory", f"VENV={venv}", target],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


def test_make_run_installs_only_when_pyproject_changed(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\n")
    newer = (REPO / "pyproject.toml").stat().st_mtime + 10

    assert "pip install" in _planned(venv, "run")  # never installed: install

    (venv / ".installed").touch()
    os.utime(venv / ".installed", (newer, newer))
    plan = _planned(venv, "run")
    assert "pip install" not in plan, plan  # installed, nothing changed: straight to serve
    assert plan.strip() == f"{venv}/bin/relay serve"

    older = newer - 3600
    os.utime(venv / ".installed", (older, older))
    assert "pip install --quiet -e ." in _planned(venv, "run")  # pyproject.toml is newer

    (venv / ".installed-test").touch()
    os.utime(venv / ".installed-test", (newer, newer))
    assert "pip install" not in _planned(venv, "install-test")
