"""report.jsonl as a resumable log (vlad/reportlog.py) and the engine options' errors, without starting Ray."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from vlad.cli import main
from vlad.errors import ConfigError
from vlad.reportlog import FINGERPRINT_KEY, Output, ReportLog, settings_fingerprint

SETTINGS = {"scorer": "winclip", "backbone": "random:tiny", "sensitivity": 0.5, "rules": None, "lvlm": None}


def test_the_fingerprint_follows_every_setting_the_references_and_the_outputs():
    base = settings_fingerprint(SETTINGS)
    assert base == settings_fingerprint(dict(reversed(SETTINGS.items())))  # order does not matter
    assert len(base) == 16
    assert settings_fingerprint({**SETTINGS, "sensitivity": 0.6}) != base
    assert settings_fingerprint({**SETTINGS, "rules": ["ignore specks"]}) != base
    ref = np.zeros((4, 4, 3), np.uint8)
    with_ref = settings_fingerprint(SETTINGS, references=[ref])
    assert with_ref != base
    assert settings_fingerprint(SETTINGS, references=[ref + 1]) != with_ref
    assert settings_fingerprint(SETTINGS, outputs={"maps": True}) != base


def test_lvlm_replicas_do_not_change_the_fingerprint_but_the_model_does():
    one = settings_fingerprint({**SETTINGS, "lvlm": "openai:http://a/v1#qwen"})
    assert settings_fingerprint({**SETTINGS, "lvlm": "openai:http://a/v1,http://b/v1#qwen"}) == one
    assert settings_fingerprint({**SETTINGS, "lvlm": "openai:http://a/v1#llava"}) != one
    assert settings_fingerprint({**SETTINGS, "lvlm": "template"}) != one


@pytest.mark.parametrize("where", ["local", "memory"])
def test_rows_append_survive_a_cut_line_and_finish_as_one_row_per_input(tmp_path, where):
    out = Output(tmp_path / "o" if where == "local" else "memory://vlad-unit/o")
    old = ReportLog(out, "old")
    old.append({"path": "a.png", "error": None})
    old.close()
    log = ReportLog(out, "new")
    log.append({"path": "a.png", "error": "unreadable"})
    log.append({"path": "b.png", "error": None})
    log.close()
    with out.open("report.jsonl", "ab") as fh:
        fh.write(b'{"path": "c.png", "err')  # killed mid-write
    log = ReportLog(out, "new")
    assert log.done == {"b.png"}  # a.png: other settings, then failed; c.png: cut short
    log.append({"path": "a.png", "error": None})
    log.append({"path": "c.png", "error": None})
    rows = log.finish(["a.png", "b.png", "c.png"])
    assert [(r["path"], r[FINGERPRINT_KEY], r["error"]) for r in rows] == [
        ("a.png", "new", None),
        ("b.png", "new", None),
        ("c.png", "new", None),
    ]
    with out.open("report.jsonl", "rb") as fh:
        assert [json.loads(line) for line in fh.read().decode().splitlines()] == rows
    if where == "memory":
        out.fs.rm("/vlad-unit", recursive=True)


def test_finish_refuses_a_report_with_an_input_missing(tmp_path):
    log = ReportLog(Output(tmp_path), "fp")
    log.append({"path": "a.png", "error": None})
    with pytest.raises(ConfigError, match=r"1 input\(s\) have no report row, e.g. b.png; run again to finish"):
        log.finish(["a.png", "b.png"])


def test_fresh_starts_the_report_afresh(tmp_path):
    log = ReportLog(Output(tmp_path), "fp")
    log.append({"path": "a.png", "error": None})
    log.close()
    assert ReportLog(Output(tmp_path), "fp", resume=False).done == set()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gpus-per-worker", "1"], "--gpus-per-worker needs --engine ray"),
        (["--ray-address", "auto"], "--ray-address needs --engine ray"),
        (["--engine", "ray", "--ray-address", "headnode"], "--ray-address 'headnode': give auto, ray://HOST:PORT"),
        (["--engine", "ray", "--gpus-per-worker", "-1"], "--gpus-per-worker and --cpus-per-worker must be >= 0"),
    ],
)
def test_engine_options_are_checked_before_any_model_loads(sample_images, tmp_path, capsys, extra, message):
    args = ["detect", str(sample_images), "--object", "x", "--backbone", "random:tiny", "--out", str(tmp_path)]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err


def test_engine_ray_without_ray_says_how_to_install_it(monkeypatch, sample_images, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    args = ["detect", str(sample_images), "--object", "x", "--backbone", "random:tiny", "--out", str(tmp_path)]
    assert main([*args, "--engine", "ray"]) == 2
    assert "--engine ray needs the 'ray' package: pip install 'vlad[ray]'" in capsys.readouterr().err


def test_a_pool_that_cannot_fit_is_an_error_on_a_local_ray_not_a_hang(caplog):
    from vlad.distributed import RayOptions, _check_capacity

    two_cpus = {"CPU": 2.0}
    _check_capacity(two_cpus, RayOptions(workers=1))
    _check_capacity(two_cpus, RayOptions(workers=2, cpus_per_worker=0.75))
    with pytest.raises(ConfigError, match=r"in this Ray's 2 CPUs \(try --cpus-per-worker 0.87 or fewer workers\)"):
        _check_capacity(two_cpus, RayOptions(workers=2))
    with pytest.raises(ConfigError, match="--workers 1 x --gpus-per-worker 1 do not fit in this Ray's 0 GPUs"):
        _check_capacity(two_cpus, RayOptions(gpus_per_worker=1))
    _check_capacity(two_cpus, RayOptions(address="auto", workers=4))  # a cluster may grow: a warning
    assert "waiting for the cluster to grow" in caplog.text
