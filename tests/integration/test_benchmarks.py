"""The benchmark scripts run: speed.py at any input size for every scorer, throughput.py prints its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlad.scorers import list_scorers

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _json_line(*args: str) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_speed_runs_every_scorer_away_from_the_native_size() -> None:
    """128 px on a 64 px backbone: the bare forward is re-gridded as the scorers' forwards are."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import speed\n"
        "for s in sys.argv[2:]:\n"
        "    speed.main(['--scorer', s, '--backbone', 'random:tiny', '--size', '128', '--repeats', '1', "
        "'--device', 'cpu'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(BENCH), *list_scorers()], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [line["scorer"] for line in lines] == list_scorers()
    for line in lines:
        assert line["size"] == 128
        assert line["images_per_s"] > 0
        assert line["bare_forward_ms_per_image"] > 0


@pytest.mark.parametrize("kinds", ["small"])
def test_throughput_prints_its_json_line(kinds: str) -> None:
    line = _json_line(str(BENCH / "throughput.py"), "--backbone", "random:tiny", "--n", "2", "--kinds", kinds)
    assert line["scorer"] == "winclip"
    assert line["scorer_only_images_per_s"] > 0
    small = line["small"]
    assert small["side"] == 64
    assert small["failed"] == 0
    assert small["images_per_s"] > 0
    assert small["ratio_to_scorer_only"] == pytest.approx(
        small["images_per_s"] / line["scorer_only_images_per_s"], 1e-2
    )
    assert small["peak_rss_mb_2n"] > 0
