"""vlad.grounding: boxes, FiLo's filter, which_object, spec parsing, offline errors, and the two transformers
detectors loaded from tiny random models saved to a temporary folder (the real local-folder loading path).

Random weights prove plumbing and geometry only, never detection quality.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlad.errors import ConfigError, WeightsNotFoundError
from vlad.grounding import Box, NoDetector, ObjectDetector, filter_boxes, get_detector, iou, nms, which_object

PHRASES = ["a screw", "a bottle cap"]
OWL_WORDS = ["a", "screw", "bottle", "cap", "scratch"]


# ---------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 182 k-parameter Grounding DINO and its processor (BERT tokenizer from a 11-word vocab), saved."""
    import torch
    from transformers import (
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    folder = tmp_path_factory.mktemp("gdino")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "screw", "bottle", "cap", "scratch"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(str(folder / "vocab.txt"), do_lower_case=True)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 192})
    swin = SwinConfig(
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=7,
        image_size=128,
        out_features=["stage2", "stage3", "stage4"],
        out_indices=[2, 3, 4],
    )
    text = dict(
        model_type="bert",
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=37,
    )
    config = GroundingDinoConfig(
        backbone_config=swin,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=5,
        num_feature_levels=4,
        encoder_n_points=1,
        decoder_n_points=1,
        max_text_len=16,
    )
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random OWLv2 (32 px input, 8 px patches: a 4 x 4 grid of boxes) with a CLIP BPE tokenizer whose vocabulary
    and merges are built here. The box head's last layer is zeroed so every box is its patch's prior box."""
    import torch
    from transformers import (
        CLIPTokenizerFast,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    folder = tmp_path_factory.mktemp("owlv2")
    letters = sorted(set("".join(OWL_WORDS)))
    vocab = {t: i for i, t in enumerate(letters + [c + "</w>" for c in letters])}
    merges: list[tuple[str, str]] = []
    for word in OWL_WORDS:  # merge each word left to right into one token "word</w>"
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pair[0] + pair[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):  # OWLv2 masks queries whose first id is 0: keep them > 0
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizerFast(vocab=vocab, merges=merges, model_max_length=16)
    special_ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    config = Owlv2Config(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=16,
            pad_token_id=vocab["<|endoftext|>"],
            **special_ids,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(folder)
    image_processor = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _image(width: int = 150, height: int = 100, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _check_boxes(boxes: list[Box], image: Image.Image, phrases: list[str]) -> None:
    assert boxes, "the tiny model at threshold 0 should report boxes"
    width, height = image.size
    scores = [b.score for b in boxes]
    assert scores == sorted(scores, reverse=True)
    for box in boxes:
        x0, y0, x1, y1 = box.xyxy
        assert 0 <= x0 < x1 <= width
        assert 0 <= y0 < y1 <= height
        assert 0.0 <= box.score <= 1.0
        assert box.phrase in phrases
        assert box.image_size == (width, height)
        assert box.area == pytest.approx((x1 - x0) * (y1 - y0))
        assert box.position in (
            "top left",
            "top",
            "top right",
            "left",
            "center",
            "right",
            "bottom left",
            "bottom",
            "bottom right",
        )
        assert json.loads(json.dumps(box.to_dict()))["phrase"] == box.phrase


# ---------------------------------------------------------------------------------------------- Grounding DINO
def test_grounding_dino_from_local_folder_through_spec(gdino_dir: Path):
    detector = get_detector(f"grounding-dino:{gdino_dir}", device="cpu", text_threshold=0.0)
    assert isinstance(detector, ObjectDetector)
    assert detector.spec == f"grounding-dino:{gdino_dir.resolve()}"
    image = _image(150, 100)
    boxes = detector.detect(image, PHRASES, threshold=0.0)
    _check_boxes(boxes, image, PHRASES)
    assert len(boxes) <= 5  # num_queries


def test_grounding_dino_boxes_match_the_raw_model_in_image_pixels(gdino_dir: Path):
    """Boxes are the model's normalised (cx, cy, w, h) scaled by (width, height), clipped: no axis swap."""
    import torch

    detector = get_detector(str(gdino_dir), device="cpu", text_threshold=0.0)  # bare folder: type from config.json
    image = _image(160, 90, seed=3)
    boxes = detector.detect(image, PHRASES, threshold=0.0)
    inputs = detector.processor(images=image, text="a screw. a bottle cap.", return_tensors="pt")
    with torch.no_grad():
        cx, cy, w, h = detector.model(**inputs).pred_boxes[0].unbind(-1)
    expected = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * torch.tensor([160, 90, 160, 90])
    expected = expected.clamp(min=0).minimum(torch.tensor([160, 90, 160, 90])).numpy()
    for box in boxes:
        assert np.abs(expected - np.array(box.xyxy)).max(axis=1).min() < 1e-3


def test_grounding_dino_caption_is_lower_case_dot_separated(gdino_dir: Path):
    detector = get_detector(f"grounding-dino:{gdino_dir}", device="cpu")
    phrases, caption, token_sets, _ = detector._caption(["A Screw", "bottle cap."])
    assert caption == "a screw. bottle cap."
    assert phrases == ["A Screw", "bottle cap."]
    assert token_sets == [[1, 2], [4, 5]]  # [CLS] a screw . bottle cap . [SEP]


def test_grounding_dino_drops_phrases_beyond_the_text_length(gdino_dir: Path, caplog: pytest.LogCaptureFixture):
    detector = get_detector(f"grounding-dino:{gdino_dir}", device="cpu", text_threshold=0.0)
    many = ["a screw", "a bottle cap", "a scratch", "a cap", "a bottle", "screw cap"]  # 19 tokens > 16
    with caplog.at_level("WARNING"):
        boxes = detector.detect(_image(), many, threshold=0.0)
    assert "dropped phrases" in caplog.text
    kept, _, _, ids = detector._caption(many)
    assert len(ids) <= 16
    assert kept == many[: len(kept)]
    assert len(kept) < len(many)
    assert {b.phrase for b in boxes} <= set(kept)


def test_grounding_dino_thresholds(gdino_dir: Path):
    detector = get_detector(f"grounding-dino:{gdino_dir}", device="cpu", box_threshold=1.0, text_threshold=0.0)
    assert detector.detect(_image(), PHRASES) == []  # nothing scores above 1: an empty list, not an error
    assert detector.detect(_image(), PHRASES, threshold=0.0)  # the per-call threshold wins
    strict = get_detector(f"grounding-dino:{gdino_dir}", device="cpu", text_threshold=1.0)
    assert strict.detect(_image(), PHRASES, threshold=0.0) == []  # no token reaches text_threshold


def test_grounding_dino_accepts_a_prebuilt_pair_and_a_file(gdino_dir: Path, tmp_path: Path):
    loaded = get_detector(f"grounding-dino:{gdino_dir}", device="cpu", text_threshold=0.0)
    from vlad.grounding import GroundingDinoDetector

    detector = GroundingDinoDetector((loaded.model, loaded.processor), device="cpu", text_threshold=0.0)
    assert detector.spec == "grounding-dino:<in-memory>"
    path = tmp_path / "part.png"
    _image(120, 80).save(path)
    assert detector.detect(path, PHRASES, threshold=0.0) == loaded.detect(Image.open(path), PHRASES, threshold=0.0)


def test_bad_phrases_and_thresholds(gdino_dir: Path):
    detector = get_detector(f"grounding-dino:{gdino_dir}", device="cpu")
    with pytest.raises(ConfigError, match="phrases is empty"):
        detector.detect(_image(), [])
    with pytest.raises(ConfigError, match="list of strings"):
        detector.detect(_image(), "screw")
    with pytest.raises(ConfigError, match="non-empty string"):
        detector.detect(_image(), ["screw", "  "])
    with pytest.raises(ConfigError, match=r"must not contain '\.'"):
        detector.detect(_image(), ["no. 5 screw"])
    with pytest.raises(ConfigError, match=r"threshold must be a number in \[0, 1\], got 1.5"):
        detector.detect(_image(), ["screw"], threshold=1.5)
    with pytest.raises(ConfigError, match="image must be a PIL image or a file path"):
        detector.detect(np.zeros((8, 8, 3), np.uint8), ["screw"])
    with pytest.raises(ConfigError, match="text_threshold"):
        get_detector(f"grounding-dino:{gdino_dir}", text_threshold=-0.1)


def test_wrong_model_type_is_a_config_error(gdino_dir: Path, owl_dir: Path):
    with pytest.raises(ConfigError, match="is a 'grounding-dino' model but owlv2 needs"):
        get_detector(f"owlv2:{gdino_dir}", device="cpu")
    with pytest.raises(ConfigError, match="is a 'owlv2' model but grounding-dino needs"):
        get_detector(f"grounding-dino:{owl_dir}", device="cpu")


# ---------------------------------------------------------------------------------------------- OWLv2
def test_owlv2_from_local_folder(owl_dir: Path):
    detector = get_detector(f"owlv2:{owl_dir}", device="cpu")
    assert detector.spec == f"owlv2:{owl_dir.resolve()}"
    image = _image(150, 60)
    boxes = detector.detect(image, PHRASES, threshold=0.0)
    _check_boxes(boxes, image, PHRASES)


def test_owlv2_boxes_on_a_non_square_image_use_the_padded_square(owl_dir: Path):
    """With the box head zeroed every box is its patch's prior box on the 4 x 4 grid of the *padded square*.

    For a 150 x 60 image the square's side is 150, so boxes are 37.5 px wide *and* 37.5 px high; the grid rows that
    fall in the padding (y >= 60) give no box. Scaling y by the image height instead would give 15 px high boxes."""
    detector = get_detector(f"owlv2:{owl_dir}", device="cpu", nms_iou=None)
    image = _image(150, 60, seed=5)
    boxes = detector.detect(image, ["a screw"], threshold=0.0)
    side, cell = 150.0, 150.0 / 4
    expected = set()
    for row in range(4):
        for col in range(4):
            cx, cy = (col + 1) * side / 4, (row + 1) * side / 4  # OWLv2's prior centres are the cells' far corners
            x0, y0, x1, y1 = cx - cell / 2, cy - cell / 2, min(cx + cell / 2, 150), min(cy + cell / 2, 60)
            if y0 < 60:
                expected.add((round(x0), round(y0), round(x1), round(y1)))
    got = {tuple(round(c) for c in b.xyxy) for b in boxes}
    assert got == expected
    assert all(b.xyxy[3] <= 60 and b.xyxy[2] <= 150 for b in boxes)


def test_owlv2_threshold_and_nms(owl_dir: Path):
    detector = get_detector(f"owlv2:{owl_dir}", device="cpu", nms_iou=0.0)
    assert detector.detect(_image(), PHRASES, threshold=1.0) == []
    boxes = detector.detect(_image(96, 96), PHRASES, threshold=0.0)
    for i, a in enumerate(boxes):  # with nms_iou 0 no two boxes of one phrase overlap
        assert all(iou(a, b) == 0.0 for b in boxes[i + 1 :] if b.phrase == a.phrase)


# ---------------------------------------------------------------------------------------------- specs and offline
def test_get_detector_specs_and_errors(tmp_path: Path):
    assert isinstance(get_detector("none"), NoDetector)
    assert get_detector("none").detect(_image(), ["screw"]) == []
    with pytest.raises(ConfigError, match="phrases is empty"):
        get_detector("none").detect(_image(), [])
    with pytest.raises(ConfigError, match=r"unknown detector spec 'yolo'; use one of: grounding-dino, .*owlv2:MODEL"):
        get_detector("yolo")
    with pytest.raises(ConfigError, match="empty detector spec"):
        get_detector(" ")
    with pytest.raises(ConfigError, match="names no model after ':'"):
        get_detector("owlv2:")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="'bert'"):
        get_detector(str(tmp_path))


def test_missing_local_folder_is_reported(tmp_path: Path):
    with pytest.raises(WeightsNotFoundError, match="is not a folder"):
        get_detector(f"grounding-dino:{tmp_path / 'nope'}", device="cpu")


def test_offline_missing_model_fails_fast_with_instructions(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        get_detector("grounding-dino:vlad-test/not-a-cached-model", device="cpu")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "vlad-test/not-a-cached-model" in message
    assert "--detector-model grounding-dino:" in message
    assert "offline" in message
    assert "\n" not in message


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch):
    from vlad.grounding import _loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(_loading, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(WeightsNotFoundError, match="owlv2-not-cached.*not reachable.*--detector-model owlv2:DIR"):
        get_detector("owlv2:vlad-test/owlv2-not-cached", device="cpu")


def test_import_does_not_load_torch():
    code = "import sys, vlad.grounding; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- boxes
def test_box_fields_and_helpers():
    box = Box((10, 20, 40, 30), 0.9, "screw", (90, 60))
    assert box.xyxy == (10.0, 20.0, 40.0, 30.0)
    assert isinstance(box.xyxy[0], float)
    assert box.area == 300.0
    assert box.center == (25.0, 25.0)
    assert box.position == "left"  # x 25 < 90 / 3, y 20 <= 25 < 40
    assert box.position_in((30, 30)) == "bottom right"
    assert box.to_dict() == {
        "bbox": [10.0, 20.0, 40.0, 30.0],
        "score": 0.9,
        "phrase": "screw",
        "area": 300.0,
        "center": [25.0, 25.0],
        "position": "left",
    }
    with pytest.raises(ConfigError, match="needs the image size"):
        _ = Box((0, 0, 1, 1), 0.5, "x").position
    with pytest.raises(ConfigError, match="x0 <= x1"):
        Box((5, 0, 1, 1), 0.5, "x")
    with pytest.raises(ConfigError, match=r"score must be a number in \[0, 1\]"):
        Box((0, 0, 1, 1), 1.5, "x")
    with pytest.raises(ConfigError, match="four finite numbers"):
        Box((0, 0, float("nan"), 1), 0.5, "x")


def test_filter_boxes_drops_large_boxes_and_keeps_the_best_when_none_survive():
    size = (100, 100)
    whole = Box((0, 0, 100, 100), 0.95, "object", size)
    big = Box((0, 0, 100, 70), 0.9, "object", size)  # exactly 70 %: dropped (FiLo drops >= 0.7)
    small = Box((10, 10, 30, 30), 0.4, "scratch", size)
    medium = Box((0, 0, 80, 80), 0.6, "dent", size)  # 64 %
    assert filter_boxes([small, whole, big, medium], image_size=size) == [medium, small]
    assert filter_boxes([big, whole], image_size=size) == [whole]
    assert filter_boxes([big, whole], image_size=size, keep_best_if_empty=False) == []
    assert filter_boxes([], image_size=size) == []
    assert filter_boxes([medium, small], image_size=size, max_area_fraction=0.5) == [small]
    with pytest.raises(ConfigError, match="max_area_fraction"):
        filter_boxes([small], image_size=size, max_area_fraction=0.0)
    with pytest.raises(ConfigError, match="image_size"):
        filter_boxes([small], image_size=(100,))


def test_which_object_uses_anomaly_mass_or_the_mask():
    amap = np.zeros((40, 60), np.float32)
    amap[5:15, 40:50] = 1.0  # 100 units of mass, inside the right box
    amap[30:35, 0:4] = 0.5  # 10 units, inside no box
    left = Box((0, 0, 30, 25), 0.9, "screw")
    right = Box((35, 0, 60, 20), 0.5, "nut")
    ranked = which_object([left, right], amap)
    assert [b.phrase for b, _ in ranked] == ["nut", "screw"]
    assert ranked[0][1] == pytest.approx(100 / 110)
    assert ranked[1][1] == 0.0
    mask = np.zeros_like(amap, bool)
    mask[0:10, 0:10] = True  # all predicted pixels sit in the left box
    assert which_object([left, right], amap, mask)[0] == (left, 1.0)
    assert which_object([left, right], amap, np.zeros_like(mask)) == ranked  # empty mask: back to the mass
    part = Box((40.5, 0, 60, 20), 0.5, "part")  # half of column 40 (5 units) and columns 41..49 (90 units)
    assert which_object([part], amap)[0][1] == pytest.approx(95 / 110)
    assert which_object([left], np.zeros((4, 4)))[0][1] == 0.0
    assert which_object([], amap) == []
    with pytest.raises(ConfigError, match="pred_mask shape"):
        which_object([left], amap, np.zeros((4, 4), bool))
    with pytest.raises(ConfigError, match="NaN"):
        which_object([left], np.full((4, 4), np.nan))


def test_nms_and_iou():
    a = Box((0, 0, 10, 10), 0.9, "screw")
    b = Box((1, 1, 11, 11), 0.8, "screw")  # IoU 81 / 119
    c = Box((1, 1, 11, 11), 0.7, "nut")
    assert iou(a, b) == pytest.approx(81 / 119)
    assert nms([c, b, a], 0.5) == [a, c]
    assert nms([c, b, a], 0.5, per_phrase=False) == [a]
    assert nms([c, b, a], 0.7) == [a, b, c]
    with pytest.raises(ConfigError, match="iou_threshold"):
        nms([a], 2.0)
