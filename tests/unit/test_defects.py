"""Dataset defect names versus prompt phrases (vlad.data.defects) and VisA's per-image defect labels."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from vlad.data import load_visa
from vlad.data.datasets import Sample
from vlad.data.defects import defect_names, normalize_text, prompt_overlap_warnings, shared_names


def _sample(category, defect, label=1):
    return Sample(Path(f"{category}/{defect}.png"), category, label, defect, None, "test")


def test_normalize_text():
    assert normalize_text("Gray_Stroke") == "gray stroke"
    assert normalize_text("a grey-stroke!") == "a gray stroke"
    assert normalize_text("Different Colour Spot") == "different color spot"


def test_defect_names_per_category():
    samples = [
        _sample("tile", "glue_strip"),
        _sample("tile", "good", 0),
        _sample("tile", "crack"),
        _sample("candle", "chunk of wax missing,Different colour spot"),
        _sample("pcb1", "anomaly"),
        _sample("candle", "other"),
    ]
    assert defect_names(samples) == {
        "tile": ["crack", "glue strip"],
        "candle": ["chunk of wax missing", "different color spot"],
    }


def test_shared_names_rule():
    names = ["glue_strip", "gray_stroke", "crack", "poke", "broken", "different colour spot"]
    assert shared_names(["a glue strip on the tile", "a crack", "broken"], names) == ["glue strip"]
    assert shared_names(["grey stroke"], names) == ["gray stroke"]
    assert shared_names(["poke", "a poked hole"], names) == ["poke"]  # a bare label; a word inside a phrase is fine
    assert shared_names(["a spot of different colour", "strips of glue"], names) == []
    assert shared_names(["a different color spot here"], names) == ["different color spot"]


class _Scorer:
    def __init__(self, phrases):
        self.phrases = phrases
        self.asked = []

    def prompt_phrases(self, object_name):
        self.asked.append(object_name)
        return self.phrases


def test_prompt_overlap_warnings():
    samples = [_sample("tile", "glue_strip"), _sample("metal_nut", "flip"), _sample("pcb1", "anomaly")]
    scorer = _Scorer(["damaged {}", "a glue strip", "flip"])
    assert prompt_overlap_warnings(scorer, samples) == [
        "prompts share phrases with metal_nut's defect names: flip",
        "prompts share phrases with tile's defect names: glue strip",
    ]
    assert scorer.asked == ["metal nut", "tile"]  # the prompt name of each category
    assert prompt_overlap_warnings(_Scorer(["a crack", "damaged tile"]), samples) == []
    assert prompt_overlap_warnings(object(), samples) == []


def test_shipped_filo_prompts_share_nothing_with_mvtec_names(tiny_backbone):
    from vlad.scorers.filo import FiloScorer

    filo = FiloScorer(tiny_backbone, detector="none")
    samples = [
        _sample(c, d)
        for c, ds in {
            "tile": ["glue_strip", "gray_stroke", "oil", "rough", "crack"],
            "bottle": ["broken_large", "contamination"],
            "grid": ["broken", "bent", "glue"],
        }.items()
        for d in ds
    ]
    assert prompt_overlap_warnings(filo, samples) == []
    filo.ensemble.extra_anomalous = ("{} with a glue strip",)  # e.g. a user rule copying a label
    assert prompt_overlap_warnings(filo, samples) == ["prompts share phrases with tile's defect names: glue strip"]


def test_visa_defects_come_from_image_anno(tmp_path):
    root = tmp_path / "visa"
    rows, anno = ["object,split,label,image,mask"], ["image,label,mask"]
    for i, label in enumerate(["chunk of wax missing", "different colour spot,weird candle wick"]):
        rel, mask = f"candle/Data/Images/Anomaly/{i:03d}.JPG", f"candle/Data/Masks/Anomaly/{i:03d}.png"
        for p in (rel, mask):
            (root / p).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16)).save(root / p, format="PNG")
        rows.append(f"candle,test,anomaly,{rel},{mask}")
        anno.append(f'{rel},"{label}",{mask}')
    rel = "candle/Data/Images/Normal/000.JPG"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16)).save(root / rel, format="PNG")
    rows.append(f"candle,test,normal,{rel},")
    anno.append(f"{rel},normal,")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    assert [s.defect for s in load_visa(root, "candle")] == ["anomaly", "anomaly", "good"]  # no image_anno.csv
    (root / "candle" / "image_anno.csv").write_text("\n".join(anno) + "\n")
    samples = load_visa(root, "candle")
    assert [s.defect for s in samples] == ["chunk of wax missing", "different colour spot,weird candle wick", "good"]
    assert defect_names(samples) == {"candle": ["chunk of wax missing", "different color spot", "weird candle wick"]}
