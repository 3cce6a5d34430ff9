"""Importing official Crane / AnomalyCLIP checkpoints, and the paper profile against an independent re-implementation
of the references' inference on the same random weights (tests/helpers/official_layout.py)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from tests.helpers.official_layout import (
    official_state,
    reference_anomalyclip,
    reference_crane,
    reference_text_features,
    register_deep_model,
    save_official,
)
from vlad.adapters import apply_adapter, load_adapter
from vlad.backbones import load_backbone
from vlad.checkpoints import import_checkpoint
from vlad.cli import main
from vlad.errors import ConfigError
from vlad.scorers import get_scorer


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    spec = register_deep_model(tmp_path_factory.mktemp("cfg"))
    return spec, load_backbone(spec, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return [rng.randint(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(3)]


@pytest.mark.parametrize(("fmt", "scorer"), [("crane", "crane"), ("anomalyclip", "anomalyclip")])
def test_import_writes_an_adapter_that_splices_the_deep_prompts(deep, tmp_path, fmt, scorer):
    spec, backbone = deep
    state = official_state(backbone, depth=4, projections=fmt == "anomalyclip", seed=1)
    ckpt = save_official(state, tmp_path / "epoch_5.pth")
    out = import_checkpoint(ckpt, fmt, spec, tmp_path / "adapter")
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["deep_prompts"] == {"depth": 4, "n_ctx": 4, "round_fp16": True}
    assert meta["provenance"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert (meta["provenance"]["format"], meta["epochs"], meta["profile"]) == (fmt, 5, "paper")
    assert (meta["layers"], meta["attention"]) == ([4], "vv" if fmt == "anomalyclip" else "qq+kk+vv")
    ignored = meta["provenance"]["ignored_keys"]
    assert (len(ignored) == 6) == (fmt == "anomalyclip")  # the unused compound_prompt_projections
    adapter = load_adapter(out)
    assert sorted(adapter.tensors) == ["ctx_neg", "ctx_pos", "deep.0", "deep.1", "deep.2"]
    s = get_scorer(scorer, backbone=backbone)
    before = s.text_prototypes("object").clone()
    apply_adapter(s, out)
    expected = reference_text_features(backbone.model, state)
    got = s.text_prototypes("anything")
    assert not torch.allclose(got, before, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not any("import-checkpoint" in w for w in s.warnings())


def test_deep_prompts_are_rounded_through_fp16(deep, tmp_path):
    """The reference casts deep prompts to fp16 before splicing: values below fp16 resolution must not matter."""
    spec, backbone = deep
    state = official_state(backbone, depth=4, seed=2)
    nudged = {k: v.clone() for k, v in state.items()}
    for i in range(3):  # already rounded: identical after the reference's .half(), different before it
        nudged[f"compound_prompts_text.{i}"] = state[f"compound_prompts_text.{i}"].half().float()
    assert not torch.equal(nudged["compound_prompts_text.0"], state["compound_prompts_text.0"])
    feats = []
    for name, st in (("a", state), ("b", nudged)):
        out = import_checkpoint(save_official(st, tmp_path / f"{name}.pth"), "crane", spec, tmp_path / name)
        feats.append(apply_adapter(get_scorer("crane", backbone=backbone), out).text_prototypes("x"))
    assert torch.equal(feats[0], feats[1])


@pytest.mark.parametrize(("fmt", "reference"), [("crane", reference_crane), ("anomalyclip", reference_anomalyclip)])
def test_paper_profile_equals_the_reference_computation(deep, tmp_path, images, fmt, reference):
    spec, backbone = deep
    state = official_state(backbone, depth=4, projections=fmt == "anomalyclip", seed=3)
    out = import_checkpoint(save_official(state, tmp_path / "epoch_1.pth"), fmt, spec, tmp_path / "ad")
    scorer = apply_adapter(get_scorer(fmt, backbone=backbone, batch_size=3), out)
    assert (scorer.profile, scorer.image_size) == ("paper", 96)
    results = scorer.score_many(images, "object")
    x = backbone.preprocess([__import__("PIL.Image", fromlist=["Image"]).fromarray(i) for i in images], 96)
    taps = [1, 2, 3, 4] if fmt == "crane" else [4]  # Crane's --features_list 6 12 18 24 (aliased), AnomalyCLIP's 24
    ref_scores, ref_maps = reference(backbone.model, x, reference_text_features(backbone.model, state), taps)
    maps = np.stack([r.anomaly_map for r in results])
    np.testing.assert_allclose([r.pred_score for r in results], ref_scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(maps, ref_maps, atol=1e-5, rtol=0)
    vlad_profile = apply_adapter(get_scorer(fmt, backbone=backbone, profile="vlad"), out).score_many(images, "object")
    assert np.abs(np.stack([r.anomaly_map for r in vlad_profile]) - ref_maps).max() > 1e-3  # the profiles differ


def _write(tmp_path, state, name="bad.pth"):
    return save_official(state, tmp_path / name)


def test_bad_checkpoints_get_one_line_errors(deep, tmp_path):
    spec, backbone = deep
    good = official_state(backbone, depth=4)
    garbage = tmp_path / "notes.pth"
    garbage.write_text("not a checkpoint")
    cases = [
        (garbage, "crane", "is not a PyTorch tensor checkpoint"),
        (
            _write(tmp_path, {k: v for k, v in good.items() if k != "ctx_neg"}, "m.pth"),
            "crane",
            r"missing key\(s\) \['ctx_neg'\]",
        ),
        (_write(tmp_path, official_state(backbone, projections=True), "a.pth"), "crane", "use --format anomalyclip"),
        (
            _write(
                tmp_path,
                {k: torch.zeros(*v.shape[:-1], 48) if v.is_floating_point() else v for k, v in good.items()},
                "w.pth",
            ),
            "crane",
            "context width 48 does not fit the text width 32 of random:vlad-test-deep",
        ),
        (_write(tmp_path, official_state(backbone, depth=9), "d.pth"), "crane", "8 deep prompts need 9 text blocks"),
        (tmp_path / "absent.pth", "crane", "not found"),
        (
            _write(tmp_path, good, "f.pth"),
            "winclip",
            "unknown checkpoint format 'winclip'; allowed: crane, anomalyclip",
        ),
    ]
    for path, fmt, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            import_checkpoint(path, fmt, spec, tmp_path / "out")
        assert "\n" not in str(info.value)


def test_token_embeddings_of_another_clip_are_refused_unless_forced(deep, tmp_path):
    spec, backbone = deep
    state = official_state(backbone, depth=4)
    state["token_suffix_pos"] = state["token_suffix_pos"] + 0.05
    path = _write(tmp_path, state)
    with pytest.raises(ConfigError, match=r"differ from .*own \(max \|diff\| 0.05\): it was trained on another CLIP"):
        import_checkpoint(path, "crane", spec, tmp_path / "out")
    assert (import_checkpoint(path, "crane", spec, tmp_path / "out", force=True) / "adapter.json").is_file()


def test_weights_only_refuses_pickled_objects(deep, tmp_path):
    spec, _ = deep
    path = tmp_path / "evil.pth"
    torch.save({"prompt_learner": {"ctx_pos": ConfigError("x")}}, path)
    with pytest.raises(ConfigError, match="is not a PyTorch tensor checkpoint"):
        import_checkpoint(path, "crane", spec, tmp_path / "out")


def test_cli_import_then_detect_with_the_adapter(deep, tmp_path, images, capsys):
    spec, backbone = deep
    ckpt = save_official(official_state(backbone, depth=4), tmp_path / "epoch_5.pth")
    out = tmp_path / "crane-visa"
    assert main(["import-checkpoint", str(ckpt), "--format", "crane", "--backbone", spec, "--out", str(out)]) == 0
    assert f"--adapter {out}" in capsys.readouterr().out
    assert main(["import-checkpoint", str(ckpt), "--format", "crane", "--backbone", spec, "--out", str(out)]) == 2
    assert "already holds an adapter" in capsys.readouterr().err
    img = tmp_path / "part.png"
    __import__("PIL.Image", fromlist=["Image"]).fromarray(images[0]).save(img)
    rows = []
    for extra in ([], ["--adapter", str(out)]):
        rc = main(
            [
                "detect",
                str(img),
                "--object",
                "part",
                "--scorer",
                "crane",
                "--backbone",
                spec,
                "--format",
                "json",
                "--no-overlay",
                "--out",
                str(tmp_path / f"o{len(extra)}"),
                *extra,
            ]
        )
        assert rc == 0
        rows.append(json.loads((tmp_path / f"o{len(extra)}" / "report.jsonl").read_text().splitlines()[0]))
    assert rows[0]["pred_score"] != pytest.approx(rows[1]["pred_score"])
    assert rows[1]["adapter"].startswith("crane-prompts:")
