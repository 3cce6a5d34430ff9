"""Cheap checks run before any model loads: bad options fail in well under a second with one line and exit 2, an
unreachable language model is a warning, and the report is written row by row (nothing is lost)."""

from __future__ import annotations

import json
import time

import pytest

from vlad.cli import main


@pytest.fixture
def never_load(monkeypatch):
    """Any attempt to build a backbone fails the test: the checks must come first."""
    import vlad.backbones

    monkeypatch.setattr(vlad.backbones, "load_backbone", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "-5"], "--threshold -5 is outside the winclip score range [0, 1]"),
        (["--scorer", "laft", "--threshold", "1.5"], "laft needs normal reference images"),
        (
            ["--image-size", "70"],
            "--image-size 70 is not a multiple of the patch size 8 of random:tiny; use e.g. 64 or 72",
        ),
        (["--rules", "scratches are fine. scratches are critical"], "contradicts"),
        (["--object", "  "], "--object must name the product"),
    ],
)
def test_bad_options_fail_before_a_model_loads(sample_images, tmp_path, capsys, never_load, extra, message):
    args = ["detect", str(sample_images), "--object", "part", "--backbone", "random:tiny", "--out", str(tmp_path / "o")]
    start = time.perf_counter()
    assert main(args + extra) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_out_that_is_a_file_or_unwritable_fails_first(sample_images, tmp_path, capsys, never_load):
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert main(["detect", str(sample_images), "--object", "p", "--backbone", "random:tiny", "--out", str(taken)]) == 2
    assert f"--out {taken} is a file" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not __import__("os").access(locked, __import__("os").W_OK):  # root writes anywhere: nothing to test
            out = locked / "o"
            assert (
                main(["detect", str(sample_images), "--object", "p", "--backbone", "random:tiny", "--out", str(out)])
                == 2
            )
            assert "cannot write there" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
    assert (
        main(
            ["eval", "--root", str(tmp_path), "--layout", "folder", "--backbone", "random:tiny", "--out", str(tmp_path)]
        )
        == 2
    )
    assert "is a folder; give the metrics JSON's file name" in capsys.readouterr().err


def test_unreachable_lvlm_is_a_warning_and_rows_are_written_as_they_come(sample_images, tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "o"
    import vlad.pipeline

    seen_rows = []
    original = vlad.pipeline.InspectionRecord.to_row

    def spy(self, *a, **k):  # the report on disk already holds every earlier row when the next one is made
        report = out / "report.jsonl"
        seen_rows.append(len(report.read_text().splitlines()) if report.exists() else 0)
        return original(self, *a, **k)

    monkeypatch.setattr(vlad.pipeline.InspectionRecord, "to_row", spy)
    code = main(
        [
            "detect",
            str(sample_images),
            "--object",
            "part",
            "--backbone",
            "random:tiny",
            "--out",
            str(out),
            "--explain",
            "--lvlm",
            f"openai:http://127.0.0.1:{port}/v1",
            "--lvlm-timeout",
            "2",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("cannot reach the LVLM server") == 1  # said once, up front, not per image
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert seen_rows == list(range(len(rows)))
    assert all(r["explanation"] for r in rows)
