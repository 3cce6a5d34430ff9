"""Optional dependencies: one ``require()``, one wording; without torch the CLI lists scorers and says what to
install."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlad._optional import MESSAGE, require
from vlad.errors import MissingDependencyError, VladError
from vlad.resources import samples_dir
from vlad.scorers import list_scorers, scorer_class, scorer_summary

# Run before anything else in a subprocess: every import of torch (or a submodule) fails as if it were not installed.
HIDE_TORCH = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
    del sys.modules[name]
"""
RUN_CLI = """
from vlad.cli import main

code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def _vlad_without_torch(*argv: str) -> subprocess.CompletedProcess:
    code = HIDE_TORCH + RUN_CLI
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)


def test_require_returns_the_module():
    import json

    assert require("json", "clip") is json


def test_require_names_the_package_and_the_extra():
    with pytest.raises(MissingDependencyError) as info:
        require("vlad_no_such_package", "explain", what="--lvlm openai:...")
    assert str(info.value) == "--lvlm openai:... needs the 'vlad_no_such_package' package: pip install 'vlad[explain]'"
    assert str(info.value) == MESSAGE.format(what="--lvlm openai:...", module="vlad_no_such_package", extra="explain")
    assert isinstance(info.value, VladError)
    assert isinstance(info.value, ImportError)  # `except ImportError` around optional imports still holds
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_scorer_summaries_are_the_class_docstrings():
    for name in list_scorers():
        doc = (scorer_class(name).__doc__ or "").strip().splitlines()[0]
        assert scorer_summary(name) == doc, f"update _SUMMARIES[{name!r}] in vlad/scorers/__init__.py"


def test_vlad_scorers_lists_every_scorer_without_torch():
    done = _vlad_without_torch("scorers")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list_scorers()
    assert lines == [f"{name:10s} {scorer_summary(name)}" for name in list_scorers()]


def test_vlad_detect_without_torch_says_what_to_install(tmp_path):
    image = samples_dir() / "good_0.png"
    done = _vlad_without_torch(
        "detect", str(image), "--object", "part", "--backbone", "random:tiny", "--out", str(tmp_path / "out")
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "vlad detect: error: the winclip scorer needs the 'torch' package: pip install 'vlad[clip]'"
    )
    assert "No module named" not in done.stdout + done.stderr
