"""The linter is part of the suite: `make test` runs ruff check and ruff format --check before pytest, and both fail on
a finding under the project's own settings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_make_test_runs_the_linter_first():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: .*\blint\b", makefile, re.M)
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check ." in lint
    assert "ruff format --check ." in lint


def test_ruff_fails_on_a_finding_and_on_unformatted_code(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx=1\n")  # an unused import (F401) and unformatted code
    config = ["--config", str(ROOT / "pyproject.toml")]
    check = subprocess.run([sys.executable, "-m", "ruff", "check", *config, str(bad)], capture_output=True, text=True)
    assert check.returncode == 1
    assert "F401" in check.stdout
    fmt = subprocess.run([sys.executable, "-m", "ruff", "format", "--check", *config, str(bad)], capture_output=True)
    assert fmt.returncode == 1


def test_the_tree_is_clean():
    check = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout[-2000:]
