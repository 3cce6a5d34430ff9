"""What `vlad eval` and `vlad detect` write for researchers: both AUPROs, raw maps, per-image records, folder datasets
without masks. Everything on the tiny random backbone."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlad
from vlad.cli import build_parser, main

PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "pixel_aupro_legacy")


def _folder_dataset(root: Path, masks: str, size: int = 64) -> Path:
    """A folder-layout category (``good/``, ``scratch/``, ``train/good/``) made from a synthetic MVTec category.

    ``masks``: ``"none"`` drops ``ground_truth/``, ``"some"`` keeps the masks of the first two defective images only.
    """
    from vlad.data.synthetic import make_synthetic_dataset

    cat = make_synthetic_dataset(root / "src", "widget", n_train=2, n_good=3, n_bad=4, size=size, kind="grid", seed=5)
    folder = root / "widget"
    folder.mkdir()
    shutil.move(str(cat / "train"), str(folder / "train"))
    shutil.move(str(cat / "test" / "good"), str(folder / "good"))
    shutil.move(str(cat / "test" / "synthetic"), str(folder / "scratch"))
    if masks == "some":
        (folder / "ground_truth" / "scratch").mkdir(parents=True)
        for mask in sorted((cat / "ground_truth" / "synthetic").iterdir())[:2]:
            shutil.move(str(mask), str(folder / "ground_truth" / "scratch" / mask.name))
    return folder


def test_eval_folder_without_masks_reports_image_metrics_and_explains_missing_pixel_metrics(tmp_path, capsys):
    folder = _folder_dataset(tmp_path, masks="none")
    out = tmp_path / "m.json"
    code = main(
        [
            "eval",
            "--root",
            str(folder),
            "--layout",
            "folder",
            "--backbone",
            "random:tiny",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    cat = data["per_category"]["widget"]
    assert cat["n_images"] == 7
    assert cat["n_anomalous"] == 4
    assert cat["n_without_mask"] == 4
    for key in ("image_auroc", "image_ap", "image_f1max"):
        assert 0.0 <= cat["metrics"][key] <= 1.0
        assert data["mean"][key] == cat["metrics"][key]
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "pixel_aupro_legacy"):
        assert cat["metrics"][key] is None
        assert data["mean"][key] is None
    assert "no anomalous image has a mask" in cat["pixel_metrics_note"]
    assert "widget" in data["pixel_metrics_note"]
    row = next(line for line in printed.splitlines() if line.startswith("widget"))
    assert row.split().count("n/a") == 5
    assert "no anomalous image has a mask" in printed


def test_eval_saved_maps_are_raw_float32_at_input_size_and_reproduce_the_reported_metrics(tmp_path, capsys):
    from vlad.data import load_mask
    from vlad.metrics import compute_image_metrics, compute_pixel_metrics

    # images 80 px, model input 64 px (random:tiny), pixel metrics at 32 px: the maps must be at 80 px
    folder = _folder_dataset(tmp_path, masks="some", size=80)
    out = tmp_path / "res" / "run.json"
    code = main(
        [
            "eval",
            "--root",
            str(folder),
            "--layout",
            "folder",
            "--backbone",
            "random:tiny",
            "--device",
            "cpu",
            "--eval-size",
            "32",
            "--batch-size",
            "3",
            "--out",
            str(out),
            "--save-maps",
        ]
    )
    assert code == 0
    assert f"anomaly maps: {tmp_path / 'res' / 'run_maps'}" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["settings"]["vlad_version"] == vlad.__version__
    assert data["settings"]["maps_dir"] == str(tmp_path / "res" / "run_maps")
    cat = data["per_category"]["widget"]
    assert "images" not in cat
    assert cat["n_without_mask"] == 2
    assert "2 anomalous image(s) have no mask" in cat["pixel_metrics_note"]
    records = data["images"]
    assert len(records) == 7
    assert {r["path"] for r in records} == {str(p) for d in ("good", "scratch") for p in (folder / d).iterdir()}
    maps, masks = [], []
    for r in records:
        assert set(r) == {"path", "category", "label", "defect", "pred_score", "mask", "map"}
        assert r["category"] == "widget"
        assert (r["label"], r["defect"]) == ((0, "good") if "/good/" in r["path"] else (1, "scratch"))
        assert Path(r["map"]) == tmp_path / "res" / "run_maps" / "widget" / r["defect"] / f"{Path(r['path']).stem}.npy"
        amap = np.load(r["map"])
        assert amap.dtype == np.float32
        assert amap.shape == (80, 80)
        if r["label"] == 1 and r["mask"] is None:
            continue  # no ground truth: not in the pixel metrics
        maps.append(np.asarray(Image.fromarray(amap).resize((32, 32), Image.Resampling.BILINEAR)))
        masks.append(np.zeros((32, 32), bool) if r["mask"] is None else load_mask(r["mask"], (32, 32)))
    assert len(maps) == 5
    assert sum(m.any() for m in masks) == 2
    pixel = compute_pixel_metrics(np.stack(maps), np.stack(masks))
    image = compute_image_metrics([r["pred_score"] for r in records], [r["label"] for r in records])
    for key, value in {**image, **pixel}.items():
        assert cat["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert set(cat["metrics"]) == set(image) | set(PIXEL_KEYS)


def test_eval_maps_dir_implies_saving_and_save_maps_needs_a_place(tmp_path, capsys):
    folder = _folder_dataset(tmp_path, masks="none")
    maps_dir = tmp_path / "maps"
    code = main(
        [
            "eval",
            "--root",
            str(folder),
            "--layout",
            "folder",
            "--backbone",
            "random:tiny",
            "--device",
            "cpu",
            "--maps-dir",
            str(maps_dir),
        ]
    )
    assert code == 0
    assert sorted(p.relative_to(maps_dir).as_posix() for p in maps_dir.rglob("*.npy")) == [
        *(f"widget/good/00{i}.npy" for i in range(3)),
        *(f"widget/scratch/00{i}.npy" for i in range(4)),
    ]
    capsys.readouterr()
    code = main(["eval", "--root", str(folder), "--layout", "folder", "--backbone", "random:tiny", "--save-maps"])
    assert code == 2
    assert "--save-maps needs --out" in capsys.readouterr().err


@pytest.fixture(scope="module")
def synthetic_mvtec(tmp_path_factory):
    from vlad.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("mvtec")
    make_synthetic_dataset(root, "tex", n_train=2, n_good=3, n_bad=3, size=64, kind="stripes", seed=3)
    return root


def test_eval_always_reports_both_aupros_and_the_old_flag_is_a_no_op(synthetic_mvtec, tmp_path, capsys):
    runs = {}
    for flag in ([], ["--legacy-aupro"]):
        out = tmp_path / f"m{len(flag)}.json"
        assert (
            main(
                [
                    "eval",
                    "--root",
                    str(synthetic_mvtec),
                    "--layout",
                    "mvtec",
                    "--backbone",
                    "random:tiny",
                    "--device",
                    "cpu",
                    "--out",
                    str(out),
                    *flag,
                ]
            )
            == 0
        )
        runs[len(flag)] = (json.loads(out.read_text()), capsys.readouterr().out)
    (plain, table), (flagged, _) = runs[0], runs[1]
    metrics = plain["per_category"]["tex"]["metrics"]
    for key in ("pixel_aupro", "pixel_aupro_legacy"):
        assert 0.0 <= metrics[key] <= 1.0
        assert plain["mean"][key] == metrics[key]
    assert metrics["pixel_aupro"] != metrics["pixel_aupro_legacy"]  # two computations, not one copied
    assert "aupro" not in metrics
    assert "aupro_legacy" not in metrics
    assert flagged["per_category"]["tex"]["metrics"] == metrics
    header = next(x for x in table.splitlines() if x.startswith("category"))
    assert header.split() == [
        "category",
        "I-AUROC",
        "I-AP",
        "I-F1max",
        "P-AUROC",
        "P-AP",
        "P-F1max",
        "AUPRO",
        "AUPRO-legacy",
    ]
    row = next(x for x in table.splitlines() if x.startswith("tex"))
    assert len(row) <= len(header)
    assert row.split()[-1] == f"{100 * metrics['pixel_aupro_legacy']:.1f}"
    assert "AUPRO-legacy: 200 thresholds" in table
    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]  # noqa: SLF001
    legacy = next(a for a in eval_parser._actions if "--legacy-aupro" in a.option_strings)  # noqa: SLF001
    assert "deprecated" in legacy.help
    assert "no effect" in legacy.help


def _image(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_detect_save_maps_collision_safe_names_and_maps_reproduce_the_regions(tmp_path, capsys):
    from vlad.regions import find_regions

    inputs = [tmp_path / "a" / "part.png", tmp_path / "b" / "part.png", tmp_path / "c" / "part_2.png"]
    sizes = [(56, 40), (48, 64), (72, 72)]
    for i, (path, size) in enumerate(zip(inputs, sizes, strict=True)):
        _image(path, size, seed=i)
    out = tmp_path / "out"
    base = [
        "detect",
        *map(str, inputs),
        "--object",
        "part",
        "--backbone",
        "random:tiny",
        "--device",
        "cpu",
        "--format",
        "json",
        "--save-maps",
    ]
    assert main([*base, "--out", str(out)]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["path"] for r in rows] == [str(p) for p in inputs]
    names = [Path(r["map"]).name for r in rows]
    assert names == ["part.npy", "part_2.npy", "part_2_2.npy"]
    for row, (w, h) in zip(rows, sizes, strict=True):
        assert Path(row["map"]).parent == out / "maps"
        assert Path(row["overlay"]).name == Path(row["map"]).stem + "_overlay.png"
        amap = np.load(row["map"])
        assert amap.dtype == np.float32
        assert amap.shape == (h, w)
    # a threshold inside the first map's range: the saved maps give back exactly the reported regions
    threshold = float(np.quantile(np.load(rows[0]["map"]), 0.9))
    again = tmp_path / "again"
    assert main([*base, "--out", str(again), "--threshold", repr(threshold)]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert rows[0]["regions"]
    for row in rows:
        amap = np.load(row["map"])
        assert row["pixel_threshold"] == pytest.approx(threshold, abs=1e-6)  # the report rounds to 6 decimals
        assert row["regions"] == [r.to_dict() for r in find_regions(amap, amap >= threshold)]
    assert all(r["map"] is None for r in _report(out.parent / "plain", inputs))


def _report(out: Path, inputs: list[Path]) -> list[dict]:
    assert (
        main(
            [
                "detect",
                *map(str, inputs),
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
        == 0
    )
    assert not (out / "maps").exists()
    return [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]


def test_eval_progress_lines_on_a_non_terminal_stderr(synthetic_mvtec, tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                "--root",
                str(synthetic_mvtec),
                "--layout",
                "mvtec",
                "--backbone",
                "random:tiny",
                "--device",
                "cpu",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval:")]
    assert err == ["eval: tex 2/6", "eval: tex 4/6", "eval: tex 6/6"]


def test_progress_prints_about_every_ten_percent_not_per_image(capsys, monkeypatch):
    from vlad.cli.common import Progress as _Progress

    bottle = _Progress("eval", "bottle")
    for done in range(1, 84):
        bottle(done, 83)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "eval: bottle 9/83"
    assert lines[-1] == "eval: bottle 83/83"
    assert len(lines) == 10
    detect = _Progress("detect")
    for done in (8, 16, 20):
        detect(done, 20)
    assert capsys.readouterr().err.splitlines() == ["detect: 8/20", "detect: 16/20", "detect: 20/20"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    tiny = _Progress("eval", "tex")
    for done in (1, 2, 3):
        tiny(done, 3)  # a terminal: tqdm (off for tiny jobs), no lines
    assert capsys.readouterr().err == ""
