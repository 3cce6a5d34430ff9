"""The wheel carries prompts/, adapters/, sample images and the tiny model config, and vlad finds them there."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_ships_data_folders_and_finds_them(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-q",
            str(ROOT),
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("vlad-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "vlad/_bundled/prompts/winclip.yaml",
        "vlad/_bundled/prompts/filo.yaml",
        "vlad/_bundled/prompts/laft.yaml",
        "vlad/_bundled/adapters/README.md",
        "vlad/backbones/configs/vlad-tiny.json",
        "vlad/samples/good_0.png",
    ):
        assert expected in names, expected
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import vlad.resources as r; "
        "print(r.prompts_dir()); print(r.adapters_dir()); print(len(r.load_prompt_file('winclip')['templates']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": ""},
    )
    prompts, adapters, n_templates = out.stdout.split()
    assert Path(prompts) == site / "vlad" / "_bundled" / "prompts"
    assert Path(adapters) == site / "vlad" / "_bundled" / "adapters"
    assert n_templates == "22"
