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


def _assert_same_rows(local: list[dict], remote: list[dict], local_out: Path, remote_out: Path) -> None:
    """The same inputs in the same order, scores to 1e-6, the same regions and overlays, the same fingerprint."""
    assert [r["path"] for r in remote] == [r["path"] for r in local]
    for a, b in zip(local, remote, strict=True):
        assert {k: b[k] for k in SAME} == {k: a[k] for k in SAME}
        assert b[FINGERPRINT_KEY] == a[FINGERPRINT_KEY]
        if a["error"] is None:
            for key in ("pred_score", "normalized_score", "threshold", "pixel_threshold"):
                assert b[key] == pytest.approx(a[key], abs=1e-6)
            assert b["regions"] == a["regions"]
            assert (
                Path(b["overlay"]).read_bytes()
                == Path(a["overlay"].replace(str(local_out), str(remote_out))).read_bytes()
            )


def test_ray_engine_gives_the_local_rows_for_a_transductive_scorer(ray_local, inputs, tmp_path, capsys):
    opts = ["--scorer", "musc", "--batch-size", "2"]  # musc scores the whole folder as one batch all the same
    assert _detect(inputs, tmp_path / "local", *opts) == 1  # 1: one input failed
    assert _detect(inputs, tmp_path / "ray", *opts, "--engine", "ray", "--workers", "1") == 1
    capsys.readouterr()
    local, remote = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert len(local) == 4
    assert sum(r["error"] is not None for r in remote) == 1
    _assert_same_rows(local, remote, tmp_path / "local", tmp_path / "ray")


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


def test_an_interrupted_local_run_resumes_where_it_stopped(monkeypatch, sample_images, tmp_path, capsys):
    from vlad.pipeline import Detector
    from vlad.reportlog import RecordWriter

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(RecordWriter, "write", _interrupt_after(RecordWriter.write, after=1))
        assert _detect(sample_images, out) == 130
    first = _rows(out)
    assert len(first) == 1  # the row written before Ctrl-C survived
    scored: list[str] = []
    real = Detector.iter_inspect

    def spy(self, items, *args, **kwargs):
        scored.extend(str(i) for i in items)
        return real(self, items, *args, **kwargs)

    monkeypatch.setattr(Detector, "iter_inspect", spy)
    assert _detect(sample_images, out) == 0
    assert "resuming: 1 of 3 images already reported" in capsys.readouterr().err
    rows = _rows(out)
    assert [r["path"] for r in rows] == sorted(str(p) for p in sample_images.iterdir())
    assert rows[0] == first[0]  # kept as it was, not scored again
    assert scored == [r["path"] for r in rows[1:]]
    # a changed setting re-scores everything; the report never mixes settings
    assert _detect(sample_images, out, "--sensitivity", "0.9") == 0
    again = _rows(out)
    assert len(again) == 3
    assert len({r[FINGERPRINT_KEY] for r in again}) == 1
    assert again[0][FINGERPRINT_KEY] != rows[0][FINGERPRINT_KEY]
    # so does another product name (argparse keeps the last --object)
    assert _detect(sample_images, out, "--sensitivity", "0.9", "--object", "screw") == 0
    assert "resuming" not in capsys.readouterr().err
    assert {r["object"] for r in _rows(out)} == {"screw"}


def test_an_interrupted_ray_run_resumes_and_gives_the_local_rows(ray_local, monkeypatch, inputs, tmp_path, capsys):
    import vlad.distributed
    from vlad.reportlog import RecordWriter

    opts = ["--batch-size", "2"]
    assert _detect(inputs, tmp_path / "local", *opts) == 1  # 1: broken.png failed
    out, ray_opts = tmp_path / "ray", [*opts, "--engine", "ray"]
    with monkeypatch.context() as m:
        m.setattr(RecordWriter, "write", _interrupt_after(RecordWriter.write, after=2))
        assert _detect(inputs, out, *ray_opts) == 130
    first = _rows(out)
    assert len(first) == 2  # the rows written before Ctrl-C survived
    scored: list[str] = []
    real = vlad.distributed.ray_inspect

    def spy(factory, groups, *args, **kwargs):  # what the driver sends the workers is what they score
        scored.extend(p for g in groups for p in g.paths)
        return real(factory, groups, *args, **kwargs)

    monkeypatch.setattr(vlad.distributed, "ray_inspect", spy)
    assert _detect(inputs, out, *ray_opts) == 1
    capsys.readouterr()
    done = {r["path"] for r in first if r["error"] is None}  # a failed row is tried again
    rows = _rows(out)
    assert scored == [r["path"] for r in rows if r["path"] not in done]
    assert [r for r in rows if r["path"] in done] == [r for r in first if r["path"] in done]  # kept as they were
    _assert_same_rows(_rows(tmp_path / "local"), rows, tmp_path / "local", out)


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


def test_eval_on_ray_gives_the_local_metrics(ray_local, tmp_path, capsys):
    from vlad.data.synthetic import make_synthetic_dataset

    root = tmp_path / "mvtec"
    make_synthetic_dataset(root, "tex", n_train=3, n_good=2, n_bad=2, size=64, kind="stripes", seed=3)
    make_synthetic_dataset(root, "tiles", n_train=3, n_good=2, n_bad=2, size=64, kind="grid", seed=4)
    args = ["eval", "--root", str(root), "--layout", "mvtec", "--backbone", "random:tiny", "--device", "cpu"]
    args += ["--shots", "2", "--batch-size", "3"]  # each category with its own references
    assert main([*args, "--out", str(tmp_path / "local.json")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray.json"), "--engine", "ray"]) == 0
    capsys.readouterr()
    local, remote = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "ray"))
    assert [i["path"] for i in remote["images"]] == [i["path"] for i in local["images"]]
    assert [i["pred_score"] for i in remote["images"]] == pytest.approx([i["pred_score"] for i in local["images"]])
    # pixel metrics read float32 maps; batches of another size move them in the 7th digit
    assert remote["mean"] == pytest.approx(local["mean"], abs=1e-5, nan_ok=True)
