"""Bounded memory: ``vlad detect`` decodes, scores, writes and releases images a batch at a time, so its peak memory
does not depend on how many images it is given."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 1600


def _large_image(path: Path) -> None:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    img = 128 + 50 * np.sin(xx / 9) * np.cos(yy / 13)
    Image.fromarray(np.repeat(img[..., None], 3, axis=-1).astype(np.uint8)).save(path)


def _folder(root: Path, source: Path, n: int) -> Path:
    folder = root / f"in{n}"
    folder.mkdir()
    for i in range(n):
        shutil.copyfile(source, folder / f"img_{i:02d}.png")
    return folder


def _detect(folder: Path, out: Path) -> tuple[float, list[dict]]:
    """Peak RSS (MiB) of one ``vlad detect`` process and its report rows."""
    cmd = [sys.executable, "-m", "vlad.cli", "detect", str(folder), "--object", "part", "--backbone", "random:tiny"]
    cmd += ["--batch-size", "4", "--out", str(out), "--format", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert os.waitstatus_to_exitcode(status) == 0, stderr[-2000:]
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    return usage.ru_maxrss / 1024, rows


def test_peak_memory_of_detect_does_not_grow_with_the_number_of_large_images(tmp_path: Path) -> None:
    """40 images of 1600 x 1600 (7.7 MB decoded each, 300 MB together) peak within 20 % of 4 of them."""
    source = tmp_path / "large.png"
    _large_image(source)
    rss4, rows4 = _detect(_folder(tmp_path, source, 4), tmp_path / "out4")
    rss40, rows40 = _detect(_folder(tmp_path, source, 40), tmp_path / "out40")
    assert len(rows4) == 4
    assert len(rows40) == 40
    assert all(r["error"] is None for r in rows40)
    assert len({r["path"] for r in rows40}) == 40
    assert all(Path(r["overlay"]).is_file() for r in rows40)
    assert rss40 <= 1.2 * rss4, f"peak RSS {rss40:.0f} MiB for 40 images vs {rss4:.0f} MiB for 4"
    for row in rows40:  # post-processing (upsampling, thresholds, regions) is timed per image
        assert set(row["timings"]) >= {"preprocess", "model", "postprocess"}
        assert row["timings"]["postprocess"] > 0
