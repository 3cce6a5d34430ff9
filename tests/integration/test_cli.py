"""`vlad detect`, `vlad eval`, `vlad scorers` end to end with the tiny random backbone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlad.cli import main
from vlad.scorers import list_scorers

REPORT_FIELDS = {
    "path",
    "object",
    "scorer",
    "backbone",
    "pred_score",
    "normalized_score",
    "pred_label",
    "threshold",
    "regions",
    "overlay",
    "timings",
    "error",
}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]


def test_detect_writes_report_and_overlays(sample_images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "detect",
            str(sample_images),
            "--object",
            "bottle",
            "--backbone",
            "random:tiny",
            "--out",
            str(out),
            "--format",
            "json",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    rows = _rows(out)
    assert printed["results"] == rows
    assert printed["failed"] == 0
    assert len(rows) == 3
    for row in rows:
        assert REPORT_FIELDS <= set(row)
        assert row["error"] is None
        assert row["object"] == "bottle"
        assert row["scorer"] == "winclip"
        overlay = Image.open(row["overlay"])
        assert overlay.size == Image.open(row["path"]).size
        legend = Path(row["overlay"]).with_name(Path(row["overlay"]).name.replace("_overlay.png", "_legend.png"))
        assert Image.open(legend).width > 0  # the verdict, colour bar and numbered regions, next to the overlay
        assert row["threshold_source"] == "default"
        assert any("random weights" in w for w in row["warnings"])


def test_detect_full_res_overlay_flag(tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 2100, 3), dtype=np.uint8)).save(big)
    out = tmp_path / "out"
    args = ["detect", str(big), "--object", "bottle", "--backbone", "random:tiny", "--device", "cpu"]
    assert main([*args, "--out", str(out), "--format", "json"]) == 0
    assert Image.open(_rows(out)[0]["overlay"]).size == (2048, 683)  # bounded by default
    assert main([*args, "--out", str(out), "--format", "json", "--full-res-overlay"]) == 0
    assert Image.open(_rows(out)[0]["overlay"]).size == (2100, 700)
    capsys.readouterr()


def test_detect_with_refs_uses_few_shot_memory(sample_images, tmp_path, capsys):
    refs = tmp_path / "refs"
    refs.mkdir()
    for p in sorted(sample_images.iterdir())[:2]:
        (refs / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    code = main(
        [
            "detect",
            str(sample_images),
            "--object",
            "bottle",
            "--backbone",
            "random:tiny",
            "--refs",
            str(refs),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "verdict" in text
    assert "report:" in text
    rows = _rows(out)
    assert {r["threshold_source"] for r in rows} == {"calibrated"}


def _bad_files(folder: Path) -> dict[str, str]:
    good = folder / "good.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(good)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image at all")
    data = good.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("1", (30000, 30000)).save(folder / "bomb.png")
    Image.fromarray(np.zeros((8, 400, 3), np.uint8)).save(folder / "sliver.png")
    return {
        "empty.png": "empty",
        "text.png": "not an image",
        "truncated.png": "truncated|corrupt",
        "bomb.png": "too large.*downscale",
        "sliver.png": "aspect ratio",
        "missing.png": "not found",
    }


def test_detect_batch_with_bad_files_reports_each_and_scores_the_rest(tmp_path, capsys):
    folder = tmp_path / "batch"
    folder.mkdir()
    expected = _bad_files(folder)
    out = tmp_path / "out"
    code = main(
        [
            "detect",
            str(folder),
            str(folder / "missing.png"),
            "--object",
            "cap",
            "--backbone",
            "random:tiny",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 1
    rows = {Path(r["path"]).name: r for r in _rows(out)}
    assert rows["good.png"]["error"] is None
    assert rows["good.png"]["verdict"] in ("normal", "anomalous")
    for name, pattern in expected.items():
        assert rows[name]["error"], name
        assert name in rows[name]["error"]  # every message names its file
        import re

        assert re.search(pattern, rows[name]["error"], re.IGNORECASE), (name, rows[name]["error"])
        assert "\n" not in rows[name]["error"]
    assert "failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scorer", "nope"], f"unknown scorer 'nope'; available: {', '.join(list_scorers())}"),
        (["--backbone", "nonsense-spec"], "unknown backbone spec 'nonsense-spec'"),
        (["--backbone", "random:NoSuchNet"], "unknown open_clip model 'NoSuchNet'"),
    ],
)
def test_detect_usage_errors_exit_2(sample_images, tmp_path, capsys, argv, message):
    code = main(["detect", str(sample_images), "--object", "x", "--out", str(tmp_path / "o"), *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_refs_without_images_exit_2(sample_images, tmp_path, capsys):
    empty = tmp_path / "norefs"
    empty.mkdir()
    code = main(
        [
            "detect",
            str(sample_images),
            "--object",
            "x",
            "--backbone",
            "random:tiny",
            "--refs",
            str(empty),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "--refs: no images" in capsys.readouterr().err


def test_empty_directory_and_bad_numbers_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["detect", str(empty), "--object", "x", "--backbone", "random:tiny"]) == 2
    assert "contains no images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["detect", str(empty), "--object", "x", "--threshold", "nan"])
    assert exc.value.code == 2
    assert "finite number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["detect", str(empty), "--object", "x", "--sensitivity", "3"])


def test_scorers_lists_winclip(capsys):
    assert main(["scorers"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == list_scorers()


@pytest.fixture(scope="module")
def synthetic_mvtec(tmp_path_factory):
    from vlad.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("mvtec")
    make_synthetic_dataset(root, "tex", n_train=4, n_good=3, n_bad=3, size=64, kind="stripes", seed=3)
    make_synthetic_dataset(root, "tiles", n_train=4, n_good=2, n_bad=2, size=64, kind="grid", seed=4)
    return root


@pytest.mark.parametrize("shots", [0, 2])
def test_eval_on_mvtec_layout(synthetic_mvtec, tmp_path, capsys, shots):
    out = tmp_path / "metrics.json"
    code = main(
        [
            "eval",
            "--root",
            str(synthetic_mvtec),
            "--layout",
            "mvtec",
            "--backbone",
            "random:tiny",
            "--shots",
            str(shots),
            "--out",
            str(out),
            "--legacy-aupro",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "tex" in table
    assert "tiles" in table
    assert "mean" in table
    data = json.loads(out.read_text())
    assert set(data["per_category"]) == {"tex", "tiles"}
    keys = {
        "image_auroc",
        "image_ap",
        "image_f1max",
        "pixel_auroc",
        "pixel_ap",
        "pixel_f1max",
        "pixel_aupro",
        "pixel_aupro_legacy",
    }
    assert keys <= set(data["mean"])
    for cat in data["per_category"].values():
        assert cat["n_images"] in (4, 6)
        assert cat["failed"] == []
        assert all(v is None or 0.0 <= v <= 1.0 for v in cat["metrics"].values())
    assert data["settings"]["shots"] == shots
    assert data["settings"]["references"] == shots


def test_eval_limit_keeps_both_classes(synthetic_mvtec, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert (
        main(
            [
                "eval",
                "--root",
                str(synthetic_mvtec),
                "--layout",
                "mvtec",
                "--category",
                "tex",
                "--limit",
                "2",
                "--backbone",
                "random:tiny",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    cat = json.loads(out.read_text())["per_category"]["tex"]
    assert cat["n_images"] == 2
    assert cat["n_anomalous"] == 1


def test_eval_unknown_category_and_layout(synthetic_mvtec, capsys):
    assert (
        main(
            [
                "eval",
                "--root",
                str(synthetic_mvtec),
                "--layout",
                "mvtec",
                "--category",
                "nope",
                "--backbone",
                "random:tiny",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "nope" in err
    assert "tex" in err
    with pytest.raises(SystemExit):
        main(["eval", "--root", str(synthetic_mvtec), "--layout", "coco"])


def test_console_script_and_benchmark_run(sample_images, tmp_path):
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "vlad.cli", "scorers"], capture_output=True, text=True, check=True)
    assert "winclip" in proc.stdout
    bench = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "speed.py"),
            "--backbone",
            "random:tiny",
            "--repeats",
            "1",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    line = json.loads(bench.stdout.strip().splitlines()[-1])
    assert line["scorer"] == "winclip"
    assert line["images_per_s"] > 0
    assert line["overhead_ratio"] > 0


@pytest.mark.parametrize("scorer", list_scorers())
def test_every_scorer_runs_through_detect_and_eval(scorer, sample_images, synthetic_mvtec, tmp_path, capsys):
    extra = ["--detector", "none"] if scorer == "filo" else []
    refs = tmp_path / "refs"
    refs.mkdir()
    for p in sorted(sample_images.iterdir())[:2]:
        (refs / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    code = main(
        [
            "detect",
            str(sample_images),
            "--object",
            "part",
            "--scorer",
            scorer,
            "--backbone",
            "random:tiny",
            "--refs",
            str(refs),
            "--out",
            str(out),
            "--device",
            "cpu",
            *extra,
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = _rows(out)
    assert len(rows) == 3
    assert all(r["scorer"] == scorer and r["error"] is None for r in rows)
    metrics = tmp_path / "m.json"
    code = main(
        [
            "eval",
            "--root",
            str(synthetic_mvtec),
            "--layout",
            "mvtec",
            "--category",
            "tex",
            "--scorer",
            scorer,
            "--backbone",
            "random:tiny",
            "--shots",
            "2",
            "--out",
            str(metrics),
            *extra,
        ]
    )
    assert code == 0, capsys.readouterr().err
    data = json.loads(metrics.read_text())
    assert data["settings"]["scorer"] == scorer
    assert data["per_category"]["tex"]["n_images"] == 6


def test_scorer_specific_options_are_checked(sample_images, tmp_path, capsys):
    code = main(
        [
            "detect",
            str(sample_images),
            "--object",
            "x",
            "--backbone",
            "random:tiny",
            "--detector",
            "owlv2",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "--detector applies to the filo scorer(s), not 'winclip'" in capsys.readouterr().err


def test_laft_without_refs_is_a_clear_error(sample_images, tmp_path, capsys):
    code = main(
        [
            "detect",
            str(sample_images),
            "--object",
            "x",
            "--scorer",
            "laft",
            "--backbone",
            "random:tiny",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "laft needs normal reference images" in capsys.readouterr().err


def test_musc_scores_a_folder_as_one_batch(sample_images, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(
        [
            "detect",
            str(sample_images),
            "--object",
            "x",
            "--scorer",
            "musc",
            "--backbone",
            "random:tiny",
            "--out",
            str(out),
            "--batch-size",
            "1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = _rows(out)
    assert len(rows) == 3
    assert all(r["error"] is None for r in rows)


def test_train_adapter_then_detect_with_it(synthetic_mvtec, sample_images, tmp_path, capsys):
    adapter = tmp_path / "adapters" / "tex-prompts"
    code = main(
        [
            "train-adapter",
            "--method",
            "crane-prompts",
            "--root",
            str(synthetic_mvtec),
            "--layout",
            "mvtec",
            "--category",
            "tex",
            "--epochs",
            "2",
            "--backbone",
            "random:tiny",
            "--device",
            "cpu",
            "--n-ctx",
            "4",
            "--out",
            str(adapter),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (adapter / "adapter.json").is_file()
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    base = ["detect", str(sample_images), "--object", "part", "--scorer", "crane", "--backbone", "random:tiny"]
    assert main([*base, "--out", str(plain)]) == 0
    assert main([*base, "--out", str(tuned), "--adapter", str(adapter)]) == 0
    a, b = _rows(plain), _rows(tuned)
    assert [r["adapter"] for r in b] == [f"crane-prompts:{adapter.name}"] * 3
    assert a[0]["adapter"] is None
    assert any(x["pred_score"] != y["pred_score"] for x, y in zip(a, b, strict=True))
    wrong = main(
        [
            "detect",
            str(sample_images),
            "--object",
            "part",
            "--scorer",
            "crane",
            "--backbone",
            "random:ViT-B-16",
            "--image-size",
            "224",
            "--out",
            str(tmp_path / "w"),
            "--adapter",
            str(adapter),
        ]
    )
    assert wrong == 2
    err = capsys.readouterr().err
    assert "random:tiny" in err
    assert "random:ViT-B-16" in err


def test_detect_explain_and_eval_lvlm_verdicts(synthetic_mvtec, sample_images, tmp_path, capsys):
    out = tmp_path / "o"
    assert (
        main(
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
            ]
        )
        == 0
    )
    rows = _rows(out)
    assert all(r["explanation"] and r["lvlm"] == "template" and r["explain_error"] is None for r in rows)
    metrics = tmp_path / "m.json"
    assert (
        main(
            [
                "eval",
                "--root",
                str(synthetic_mvtec),
                "--layout",
                "mvtec",
                "--category",
                "tex",
                "--backbone",
                "random:tiny",
                "--lvlm",
                "template",
                "--out",
                str(metrics),
            ]
        )
        == 0
    )
    verdicts = json.loads(metrics.read_text())["lvlm_verdicts"]
    assert verdicts["lvlm"] == "template"
    assert {"per_class", "macro_accuracy", "balanced_accuracy", "yes_rate", "unparseable_rate"} <= set(verdicts)
    assert set(verdicts["per_class"]) == {"tex"}
    assert "language-model verdicts" in capsys.readouterr().out


def test_detect_with_rules_records_hits(sample_images, tmp_path, capsys):
    out = tmp_path / "o"
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
            "--rules",
            "ignore the top left corner; a scratch is a defect; ignore colour",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = _rows(out)
    rules_seen = {h["rule"] for r in rows for h in r["rule_hits"]}
    assert {"a scratch is a defect", "ignore colour"} <= rules_seen
    for r in rows:
        assert all(reg["position"] != "top left" for reg in r["regions"])


def test_bad_rules_are_a_usage_error(sample_images, tmp_path, capsys):
    code = main(
        [
            "detect",
            str(sample_images),
            "--object",
            "part",
            "--backbone",
            "random:tiny",
            "--out",
            str(tmp_path / "o"),
            "--rules",
            "scratches are fine. scratches are critical",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert '"scratches are fine" contradicts "scratches are critical"' in err


def test_eval_with_concept_rules_changes_scores(synthetic_mvtec, tmp_path):
    plain, ruled = tmp_path / "a.json", tmp_path / "b.json"
    base = [
        "eval",
        "--root",
        str(synthetic_mvtec),
        "--layout",
        "mvtec",
        "--category",
        "tex",
        "--backbone",
        "random:tiny",
    ]
    assert main([*base, "--out", str(plain)]) == 0
    assert main([*base, "--out", str(ruled), "--rules", "ignore colour"]) == 0
    a = json.loads(plain.read_text())["per_category"]["tex"]["metrics"]
    b = json.loads(ruled.read_text())["per_category"]["tex"]["metrics"]
    assert a["pixel_auroc"] is not None
    assert b["pixel_auroc"] is not None
    assert any(abs(a[k] - b[k]) > 1e-9 for k in ("pixel_auroc", "pixel_ap", "pixel_aupro", "image_ap"))
