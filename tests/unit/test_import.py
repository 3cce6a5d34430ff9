"""``import vlad`` stays light: no torch, no open_clip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ["torch", "torchvision", "open_clip", "transformers", "gradio", "openai"]


def test_import_vlad_does_not_import_heavy_libraries():
    code = (
        "import json, sys, vlad, vlad.cli, vlad.result, vlad.data, vlad.metrics, vlad.viz, vlad.regions, "
        "vlad.thresholds, vlad.backbones, vlad.scorers, vlad.grounding, vlad.laft, vlad.rules, vlad.explain, "
        "vlad.cli.chat, vlad.cli.rules, vlad.cli.adapters, vlad.adapters\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_public_surface():
    import vlad

    assert vlad.list_scorers() == sorted(vlad.list_scorers())
    assert "winclip" in vlad.list_scorers()
    assert vlad.__version__
    from vlad.api import Detector

    assert vlad.Detector is Detector


def test_version_flag(capsys):
    import vlad
    from vlad.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"vlad {vlad.__version__}\n"
