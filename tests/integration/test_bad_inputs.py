"""A bad-input corpus: `vlad detect` on one folder holding every awkward kind of entry next to good images gives one
report row per entry with the right reason, exit code 1, and every readable image scored."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlad.cli import main


def _corpus(folder: Path) -> tuple[set[str], dict[str, str]]:
    """Writes the corpus; returns (names that must be scored, name -> expected reason)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(folder / "good.png")
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(folder / "good.JPG")
    frames = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)) for _ in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    (folder / "drawing.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (folder / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "notes.txt").write_text("shift 2")
    (folder / "empty.png").write_bytes(b"")
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((8, 400, 3), np.uint8)).save(folder / "sliver.png")
    os.symlink("loop.png", folder / "loop.png")
    os.symlink("gone.png", folder / "dangling.png")
    other = folder.parent / "elsewhere"
    other.mkdir()
    os.symlink(other, folder / "linked")
    os.mkfifo(folder / "pipe.png")
    (folder / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(folder / "sub" / "nested.png")
    (folder / ".DS_Store").write_bytes(b"\x00")
    scored = {"good.png", "good.JPG", "anim.gif", "nested.png"}
    reasons = {
        "drawing.svg": "SVG is a vector drawing",
        "phone.heic": "pip install 'vlad\\[heic\\]'",
        "notes.txt": "not an image file",
        "empty.png": "empty file",
        "truncated.png": "truncated",
        "sliver.png": "aspect ratio",
        "loop.png": "symlink loop",
        "dangling.png": "broken symlink",
        "linked": "linked folder not followed",
        "pipe.png": "not a regular file",
    }
    return scored, reasons


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX fifos and symlinks")
def test_every_entry_gets_a_row_with_its_reason(tmp_path, capsys):
    import re

    folder = tmp_path / "line"
    folder.mkdir()
    scored, reasons = _corpus(folder)
    out = tmp_path / "out"
    code = main(
        [
            "detect",
            str(folder),
            "--object",
            "part",
            "--backbone",
            "random:tiny",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-overlay",
        ]
    )
    assert code == 1
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == len(by_name) == len(scored) + len(reasons)  # one row per entry, none twice
    assert {n for n, r in by_name.items() if r["error"] is None} == scored
    assert all(by_name[n]["pred_score"] is not None for n in scored)
    for name, pattern in reasons.items():
        error = by_name[name]["error"]
        assert re.search(pattern, error), (name, error)
        assert "\n" not in error
        assert name in error  # the message names the entry
    assert len({tuple(r) for r in rows}) == 1  # the same keys on every row
    assert f"{len(reasons)} of {len(rows)} images failed" in capsys.readouterr().err
