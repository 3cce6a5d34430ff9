"""ONNX export (vlad.export, ``vlad export``) and the ``onnx:DIR`` runtime, on the tiny random backbone.

Parity: for every exportable scorer, zero-shot and with references where it takes them, the exported model run by
onnxruntime through the pipeline gives the torch scorer's maps and scores to 1e-4, and the same thresholds, regions
and warnings. Scorers without a fixed per-image graph are refused with one line saying why; bad options fail before
any model loads. Exports take several seconds each, so each one is made once per module.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlad.cli import main
from vlad.errors import ConfigError, MissingDependencyError
from vlad.export import CHECK_TOLERANCE, check_export, export_onnx
from vlad.pipeline import Detector
from vlad.scorers import get_scorer
from vlad.scorers.onnx_runtime import resize_bilinear

TOL = 1e-4
EXTRA = {"filo": {"detector": "none"}}
CASES = [
    ("winclip", False),
    ("winclip", True),
    ("crane", False),
    ("crane", True),
    ("anomalyclip", False),
    ("anomalyclip", True),
    ("filo", False),
    ("filo", True),
    ("laft", True),  # a kNN scorer: references only
]
pytestmark = pytest.mark.slow  # each export traces the graph (several seconds); still part of the default run


@pytest.fixture(scope="module")
def refs():
    from vlad.data.synthetic import make_texture

    rng = np.random.default_rng(11)
    return [make_texture(64, rng, kind="stripes") for _ in range(3)]


@pytest.fixture(scope="module")
def images():
    """Three images of other sizes and aspect ratios than the model input (a batch size the export never saw)."""
    from vlad.data.synthetic import make_texture

    rng = np.random.default_rng(12)
    return [make_texture(96, rng, kind="stripes")[:80, :70], make_texture(48, rng), make_texture(120, rng)[:, :100]]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, refs):
    """(scorer, few_shot) -> export folder, each made on first use."""
    made: dict[tuple[str, bool], Path] = {}

    def get(name: str, few_shot: bool) -> Path:
        if (name, few_shot) not in made:
            out = tmp_path_factory.mktemp(f"{name}_{'few' if few_shot else 'zero'}")
            export_onnx(
                name,
                "bottle",
                out,
                backbone="random:tiny",
                references=refs if few_shot else None,
                **EXTRA.get(name, {}),
            )
            made[name, few_shot] = out
        return made[name, few_shot]

    return get


@pytest.mark.parametrize(("name", "few_shot"), CASES, ids=[f"{n}-{'few' if f else 'zero'}" for n, f in CASES])
def test_exported_model_matches_torch_through_the_pipeline(name, few_shot, exports, refs, images):
    folder = exports(name, few_shot)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["check"]["max_abs_map_diff"] <= CHECK_TOLERANCE
    assert (manifest["scorer"], manifest["object"], manifest["references"]) == (name, "bottle", 3 if few_shot else 0)
    torch_scorer = get_scorer(name, backbone="random:tiny", **EXTRA.get(name, {}))
    expected = Detector(torch_scorer, references=refs if few_shot else None).inspect_many(images, "bottle")
    onnx = Detector(name, backbone=f"onnx:{folder}")
    got = onnx.inspect_many(images, "bottle")
    assert onnx.scorer.few_shot == few_shot
    for image, want, have in zip(images, expected, got, strict=True):
        a, b = want.result, have.result
        assert b.anomaly_map.shape == image.shape[:2]
        assert b.anomaly_map.dtype == np.float32
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= TOL
        assert abs(a.pred_score - b.pred_score) <= TOL
        assert (a.threshold, a.pixel_threshold, a.threshold_source) == (
            b.threshold,
            b.pixel_threshold,
            b.threshold_source,
        )
        assert a.threshold_source == ("calibrated" if few_shot else "default")
        assert [(r.bbox, r.area) for r in a.regions] == [(r.bbox, r.area) for r in b.regions]
        assert a.warnings == b.warnings
        assert any("random weights" in w for w in b.warnings)
        assert b.backbone == f"onnx:{folder}"
        assert b.scorer == name


def test_an_adapter_and_a_concept_transform_are_baked_in(tmp_path, images):
    """A LoRA adapter (vision tower) and a LAFT concept transform (features and prototypes) travel in the graph."""
    from tests.unit.test_adapters import _lora_adapter
    from vlad.adapters import apply_adapter
    from vlad.backbones import load_backbone
    from vlad.export import export_scorer

    adapter = _lora_adapter(load_backbone("random:tiny", device="cpu"))

    def build():
        return apply_adapter(get_scorer("crane", backbone="random:tiny", concepts="ignore colour"), adapter)

    manifest = export_scorer(build(), "bottle", tmp_path / "export")
    assert manifest["adapter"] == "lora:<lora adapter>"
    assert manifest["concepts"].startswith("ignore colour")
    plain = Detector(get_scorer("crane", backbone="random:tiny")).inspect_many(images, "bottle")
    expected = Detector(build()).inspect_many(images, "bottle")
    onnx = Detector("crane", backbone=f"onnx:{tmp_path / 'export'}", concepts="ignore colour")
    got = onnx.inspect_many(images, "bottle")
    assert onnx.settings()["adapter"] == "lora:<lora adapter>"
    for p, want, have in zip(plain, expected, got, strict=True):
        assert np.abs(want.result.anomaly_map - have.result.anomaly_map).max() <= TOL
        assert np.abs(p.result.anomaly_map - have.result.anomaly_map).max() > 100 * TOL  # they did change the maps


def test_cli_round_trip_gives_the_same_report(tmp_path, refs, images, capsys):
    """``vlad export`` then ``vlad detect --backbone onnx:DIR`` (laft: its references are in the export, so detect
    needs no --refs) reports what ``vlad detect`` with torch and the references reports."""
    (tmp_path / "refs").mkdir()
    (tmp_path / "imgs").mkdir()
    for i, r in enumerate(refs):
        Image.fromarray(r).save(tmp_path / "refs" / f"r{i}.png")
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "imgs" / f"p{i}.png")
    model = ["--scorer", "laft", "--object", "bottle"]
    out, with_refs = tmp_path / "export", ["--refs", str(tmp_path / "refs")]
    assert main(["export", "--format", "onnx", *model, "--backbone", "random:tiny", *with_refs, "--out", str(out)]) == 0
    assert "run it: vlad detect IMAGES --scorer laft --object bottle --backbone onnx:" in capsys.readouterr().out
    common = ["detect", str(tmp_path / "imgs"), *model, "--no-overlay", "--sensitivity", "0.9", "--format", "json"]
    assert main([*common, "--backbone", "random:tiny", *with_refs, "--out", str(tmp_path / "t")]) == 0
    assert main([*common, "--backbone", f"onnx:{out}", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    torch_rows = [json.loads(line) for line in (tmp_path / "t" / "report.jsonl").read_text().splitlines()]
    onnx_rows = [json.loads(line) for line in (tmp_path / "o" / "report.jsonl").read_text().splitlines()]
    assert len(onnx_rows) == len(images)
    assert any(r["regions"] for r in onnx_rows)
    for t, o in zip(torch_rows, onnx_rows, strict=True):
        assert (o["path"], o["verdict"], _where(o["regions"])) == (t["path"], t["verdict"], _where(t["regions"]))
        assert [r["peak_score"] for r in o["regions"]] == pytest.approx(
            [r["peak_score"] for r in t["regions"]], abs=TOL
        )
        assert abs(o["pred_score"] - t["pred_score"]) <= TOL
        assert o["backbone"] == f"onnx:{out}"
        assert t["backbone"] == "random:tiny"


def _where(regions: list[dict]) -> list[tuple]:
    return [(tuple(r["bbox"]), r["area"], r["position"]) for r in regions]


# ---------------------------------------------------------------------------------------------- refusals and errors
@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to build a scorer (and load a model) fails the test: the error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    import vlad.scorers.base  # bound to the real loader before the patch

    monkeypatch.setattr("vlad.scorers.get_scorer", refuse)
    monkeypatch.setattr(vlad.scorers.base, "load_backbone", refuse)


def _export_error(capsys, *argv: str) -> str:
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format", "tflite"], "vlad export: error: --format 'tflite' is not supported; allowed: onnx"),
        ([], "vlad export: error: --format is required; allowed: onnx"),
        (
            ["--format", "onnx", "--object", " "],
            "vlad export: error: --object must name the product, e.g. --object bottle (it is empty)",
        ),
        (["--format", "onnx"], "vlad export: error: an export is for one product: name it, e.g. --object bottle"),
        (
            ["--format", "onnx", "--object", "bottle", "--scorer", "musc"],
            "vlad export: error: cannot export musc: musc is transductive: an image's score depends on the other "
            "images scored with it, so there is no fixed per-image graph to export",
        ),
        (
            ["--format", "onnx", "--object", "bottle", "--scorer", "filo"],
            "vlad export: error: cannot export filo: filo's HQ-Loc step runs a zero-shot object detector on every "
            "image, outside the CLIP graph; export FiLo without it: --detector none",
        ),
        (
            ["--format", "onnx", "--object", "bottle", "--scorer", "crane", "--dattn", "random:dinov2-tiny"],
            "vlad export: error: cannot export crane: crane's paper-profile D-Attn takes one mean over the whole "
            "batch (the reference's computation), so an image's map depends on its batch; export without --dattn",
        ),
        (
            ["--format", "onnx", "--object", "bottle", "--scorer", "crane", "--dattn", "x", "--profile", "vlad"],
            "vlad export: error: cannot export crane: Crane+ D-Attn keeps only the DINO similarities above a hard "
            "threshold, so the exported DINO tower's rounding differences flip entries (maps differed from torch by "
            "up to 3e-3 on the test model); export without --dattn",
        ),
        (
            ["--format", "onnx", "--object", "bottle", "--scorer", "laft"],
            "vlad export: error: laft needs normal reference images: give them with --refs (detect) or --shots (eval)",
        ),
        (
            ["--format", "onnx", "--object", "bottle", "--tile", "auto"],
            "vlad export: error: --tile: an export scores whole images (tiles are cut and stitched outside the graph)",
        ),
        (
            ["--format", "onnx", "--object", "bottle", "--precision", "fp16"],
            "vlad export: error: --precision fp16: exports are fp32 (use auto or fp32)",
        ),
        (
            ["--format", "onnx", "--object", "bottle", "--backbone", "onnx:somewhere"],
            "vlad export: error: --backbone onnx:somewhere is already an export; export from a CLIP backbone",
        ),
    ],
)
def test_export_errors_come_before_any_model_loads(argv, message, tmp_path, capsys, no_model):
    assert _export_error(capsys, *argv, "--out", str(tmp_path / "out")) == message


def test_export_refuses_an_out_that_is_a_file_or_holds_an_export(tmp_path, capsys, no_model):
    file = tmp_path / "model.txt"
    file.write_text("x")
    base = ["--format", "onnx", "--object", "bottle", "--out"]
    assert _export_error(capsys, *base, str(file)) == (
        f"vlad export: error: --out {file} is a file; give a folder for model.onnx and manifest.json"
    )
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "manifest.json").write_text("{}")
    assert _export_error(capsys, *base, str(tmp_path / "done")) == (
        f"vlad export: error: --out {tmp_path / 'done'} already holds an export; choose another folder or remove it"
    )


def test_the_onnx_extra_is_named_when_missing(tmp_path, monkeypatch, no_model):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    expected = "vlad export --format onnx needs the 'onnxruntime' package: pip install 'vlad[onnx]'"
    with pytest.raises(MissingDependencyError, match=f"^{re.escape(expected)}$"):
        check_export("winclip", "bottle", tmp_path / "out", {}, has_references=False)


def test_the_runtime_holds_the_export_to_its_scorer_object_and_settings(exports, refs):
    folder = exports("crane", True)
    where = f"{folder} holds a crane export for object 'bottle' (random:tiny)"
    cases = [
        ("winclip", {}, f"{where}; it cannot run as scorer 'winclip': use --scorer crane"),
        ("crane", {"profile": "vlad"}, f"{where} with profile 'paper'; profile 'vlad' needs another export"),
        ("crane", {"image_size": 64}, f"{where} with image_size 96; image_size 64 needs another export"),
        ("crane", {"sigma": 2.0}, f"{where}; option(s) sigma are fixed at export: export again with them"),
        ("crane", {"precision": "fp16"}, f"{where} in fp32; precision 'fp16' needs another export"),
        ("crane", {"tile": 128}, f"--tile: the crane export in {folder} scores whole images only"),
        (
            "crane",
            {"concepts": "ignore colour"},
            f"{where} with concepts None; concepts 'ignore colour' needs another export",
        ),
    ]
    for name, options, message in cases:
        with pytest.raises(ConfigError) as info:
            get_scorer(name, backbone=f"onnx:{folder}", **options)
        assert str(info.value) == message
    det = Detector("crane", backbone=f"onnx:{folder}")
    assert det.detect(refs[0]).pred_score == det.detect(refs[0], "bottle").pred_score  # unnamed: the exported one
    with pytest.raises(ConfigError) as info:
        det.detect(refs[0], "screw")
    assert str(info.value) == (
        f"{folder} was exported for object 'bottle' (scorer crane); it cannot score 'screw': export again with "
        "--object screw"
    )
    with pytest.raises(ConfigError, match="holds its 3 references: export again with --refs to change them"):
        det.fit(refs)
    with pytest.raises(ConfigError, match="has its 3 references baked in and cannot score zero-shot: export again"):
        det.clear_references()
    with pytest.raises(ConfigError, match="baked in .export again to change them.; export with --adapter instead"):
        Detector("crane", backbone=f"onnx:{folder}", adapter="nothing-needed")


def test_rules_on_an_export_act_on_regions_but_cannot_change_its_prompts(exports, images):
    folder = exports("crane", True)
    det = Detector("crane", backbone=f"onnx:{folder}", rules="ignore colour\na bent pin is critical")
    (record,) = det.inspect_many(images[:1], "bottle")
    hits = {h.rule: h for h in record.result.rule_hits}
    reason = f"the crane export in {folder} has its prompts, feature transform, adapter and references baked in"
    for rule in ("ignore colour", "a bent pin is critical"):
        assert hits[rule].effect == "not applicable"
        assert hits[rule].detail["reason"].startswith(reason)
    plain = Detector("crane", backbone=f"onnx:{folder}", sensitivity=1.0).inspect_many(images[:1], "bottle")[0]
    np.testing.assert_array_equal(record.result.anomaly_map, plain.result.anomaly_map)
    rule = "ignore anything under 100 %"
    ignored = Detector("crane", backbone=f"onnx:{folder}", sensitivity=1.0, rules=rule)
    ignored = ignored.inspect_many(images[:1], "bottle")[0]
    assert plain.result.regions
    assert not [r for r in ignored.result.regions if r.source == "threshold"]


def test_a_changed_or_missing_export_is_refused(exports, tmp_path):
    folder = exports("crane", True)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_bytes((folder / "manifest.json").read_bytes())
    with pytest.raises(ConfigError) as info:
        get_scorer("crane", backbone=f"onnx:{copy}")
    assert str(info.value) == f"{copy} has a manifest but no model.onnx"
    (copy / "model.onnx").write_bytes(b"not the exported graph")
    with pytest.raises(ConfigError) as info:
        get_scorer("crane", backbone=f"onnx:{copy}")
    assert str(info.value) == (
        f"{copy / 'model.onnx'} does not match the SHA-256 in its manifest: the file changed since the export"
    )
    with pytest.raises(ConfigError) as info:
        get_scorer("crane", backbone=f"onnx:{tmp_path}")
    assert str(info.value) == f"{tmp_path} has no manifest.json: not a vlad export (vlad export --format onnx)"
    with pytest.raises(ConfigError, match="^onnx:nowhere: no such folder"):
        get_scorer("crane", backbone="onnx:nowhere")
    from vlad.backbones import load_backbone
    from vlad.errors import BackboneError

    with pytest.raises(BackboneError, match="^'onnx:nowhere' is an exported model, not a CLIP backbone: give it as"):
        load_backbone("onnx:nowhere")


HIDE_TORCH = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "open_clip"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
from vlad.cli import main

code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def test_detect_with_an_export_needs_neither_torch_nor_open_clip(exports, images, tmp_path):
    folder = exports("laft", True)
    Image.fromarray(images[0]).save(tmp_path / "part.png")
    argv = ["detect", str(tmp_path / "part.png"), "--scorer", "laft", "--object", "bottle", "--backbone"]
    argv += [f"onnx:{folder}", "--out", str(tmp_path / "out"), "--format", "json"]
    run = subprocess.run([sys.executable, "-c", HIDE_TORCH, *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "report.jsonl").read_text().splitlines()]
    assert row["error"] is None
    assert row["backbone"] == f"onnx:{folder}"
    assert (tmp_path / "out" / "part_overlay.png").is_file()


def test_bilinear_resize_is_torchs():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    for h, w, size in [(8, 8, (70, 80)), (96, 96, (100, 48)), (12, 12, (12, 12)), (20, 30, (7, 5))]:
        m = rng.random((h, w), dtype=np.float32)
        want = F.interpolate(torch.from_numpy(m)[None, None], size=size[::-1], mode="bilinear", align_corners=False)
        got = resize_bilinear(m, size)
        assert got.shape == size[::-1]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want[0, 0].numpy(), atol=1e-6)
