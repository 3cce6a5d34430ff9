"""`--engine ray` on a local two-CPU Ray (started once per session): the local engine's rows, a worker killed mid-run,
and resuming an interrupted run (both engines)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest

from vlad.cli import main
from vlad.reportlog import FINGERPRINT_KEY

pytestmark = pytest.mark.slow

BASE = ["--object", "bottle", "--backbone", "random:tiny", "--device", "cpu", "--format", "json"]
SAME = ("path", "object", "scorer", "verdict", "pred_label", "threshold_source", "image_size", "error", "warnings")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]


@pytest.fixture
def inputs(sample_images: Path) -> Path:
    """The three sample images plus one file that is not an image (it gets a failed row)."""
    (sample_images / "broken.png").write_bytes(b"not a png")
    return sample_images


def _detect(inputs: Path, out: Path, *extra: str) -> int:
    return main(["detect", str(inputs), *BASE, "--out", str(out), *extra])


@pytest.mark.parametrize(("scorer", "batch"), [("winclip", "2"), ("musc", "8")])
def test_ray_engine_gives_the_local_rows(ray_local, inputs, tmp_path, capsys, scorer, batch):
    opts = ["--scorer", scorer, "--batch-size", batch]
    assert _detect(inputs, tmp_path / "local", *opts) == 1  # 1: one input failed
    assert _detect(inputs, tmp_path / "ray", *opts, "--engine", "ray", "--workers", "1") == 1
    capsys.readouterr()
    local, remote = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert [r["path"] for r in remote] == [r["path"] for r in local]
    assert len(local) == 4
    assert sum(r["error"] is not None for r in remote) == 1
    for a, b in zip(local, remote, strict=True):
        assert {k: b[k] for k in SAME} == {k: a[k] for k in SAME}
        assert b[FINGERPRINT_KEY] == a[FINGERPRINT_KEY]
        if a["error"] is None:
            for key in ("pred_score", "normalized_score", "threshold", "pixel_threshold"):
                assert b[key] == pytest.approx(a[key], abs=1e-6)
            assert b["regions"] == a["regions"]
            assert Path(b["overlay"]).read_bytes() == Path(a["overlay"].replace("local", "ray")).read_bytes()


def test_a_worker_killed_mid_run_is_replaced_and_each_input_comes_back_once(ray_local, sample_images, tmp_path):
    from tests.helpers.ray_faults import crash_once_detector
    from vlad.distributed import Group, RayOptions, ray_inspect

    for i in range(3):  # six inputs
        shutil.copy(sample_images / f"part{i}.png", sample_images / f"copy{i}.png")
    paths = sorted(str(p) for p in sample_images.iterdir())
    flag = tmp_path / "crash-once"
    flag.touch()
    factory = functools.partial(crash_once_detector, str(flag))
    records = list(ray_inspect(factory, [Group("g", "bottle", paths)], RayOptions(workers=1), batch_size=1))
    assert not flag.exists()  # a worker did die
    assert sorted(r.record.source for r in records) == paths
    assert all(r.record.ok and r.overlay_png and r.record.result is not None for r in records)


def _interrupt_after(write, after: int):
    """A stand-in for RecordWriter.write: the first ``after`` rows are written, then Ctrl-C."""
    calls = []

    def interrupted(writer, record, *args):
        calls.append(record)
        if len(calls) > after:
            raise KeyboardInterrupt
        return write(writer, record, *args)

    return interrupted


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_an_interrupted_run_resumes_where_it_stopped(request, monkeypatch, inputs, tmp_path, capsys, engine):
    from vlad.pipeline import Detector
    from vlad.reportlog import RecordWriter

    (inputs / "broken.png").unlink()
    if engine == "ray":
        request.getfixturevalue("ray_local")
    out, opts = tmp_path / "out", ("--engine", engine)
    with monkeypatch.context() as m:
        m.setattr(RecordWriter, "write", _interrupt_after(RecordWriter.write, after=1))
        assert _detect(inputs, out, *opts) == 130
    first = _rows(out)
    assert len(first) == 1  # the row written before Ctrl-C survived
    scored: list[str] = []
    if engine == "local":
        real = Detector.iter_inspect

        def spy(self, items, *args, **kwargs):
            scored.extend(str(i) for i in items)
            return real(self, items, *args, **kwargs)

        monkeypatch.setattr(Detector, "iter_inspect", spy)
    else:  # the workers score in other processes: what the driver sends them is what gets scored
        import vlad.distributed

        real = vlad.distributed.ray_inspect

        def spy(factory, groups, *args, **kwargs):
            scored.extend(p for g in groups for p in g.paths)
            return real(factory, groups, *args, **kwargs)

        monkeypatch.setattr(vlad.distributed, "ray_inspect", spy)
    assert _detect(inputs, out, *opts) == 0
    assert "resuming: 1 of 3 images already reported" in capsys.readouterr().err
    rows = _rows(out)
    assert [r["path"] for r in rows] == sorted(str(p) for p in inputs.iterdir())
    assert rows[0] == first[0]  # kept as it was, not scored again
    assert scored == [r["path"] for r in rows[1:]]
    if engine == "ray":
        return
    # a changed setting re-scores everything; the report never mixes settings
    assert _detect(inputs, out, *opts, "--sensitivity", "0.9") == 0
    again = _rows(out)
    assert len(again) == 3
    assert len({r[FINGERPRINT_KEY] for r in again}) == 1
    assert again[0][FINGERPRINT_KEY] != rows[0][FINGERPRINT_KEY]


def test_out_can_be_an_fsspec_uri(sample_images, capsys):
    fsspec = pytest.importorskip("fsspec")
    out = "memory://vlad-test/run"
    assert main(["detect", str(sample_images), *BASE, "--out", out]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"] == f"{out}/report.jsonl"
    with fsspec.open(printed["report"], "rt") as fh:
        rows = [json.loads(line) for line in fh]
    assert len(rows) == 3
    assert all(r["overlay"].startswith(out + "/") for r in rows)
    with fsspec.open(rows[0]["overlay"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["detect", str(sample_images), *BASE, "--out", out]) == 0  # nothing left to score
    assert "resuming: 3 of 3" in capsys.readouterr().err
    fsspec.filesystem("memory").rm("/vlad-test", recursive=True)
