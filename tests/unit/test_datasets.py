"""Tests for vlad.data.datasets: MVTec, VisA and folder layouts built in tmp_path, errors, few-shot references."""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

import pytest
from PIL import Image

from vlad.data.datasets import (
    VISA_CLASS_NAMES,
    Sample,
    list_categories,
    load_dataset,
    load_folder,
    load_mvtec,
    load_visa,
    prompt_name,
    reference_images,
)
from vlad.errors import ConfigError, DatasetError


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 128).save(path)
    return path


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec"
    for i in range(10):
        _img(root / "bottle" / "train" / "good" / f"{i:03d}.png")
    _img(root / "bottle" / "test" / "good" / "000.png")
    _img(root / "bottle" / "test" / "good" / "001.png")
    _img(root / "bottle" / "test" / "broken_large" / "000.png")
    _img(root / "bottle" / "test" / "broken_large" / "001.png")  # mask missing on purpose
    _img(root / "bottle" / "test" / "contamination" / "000.png")
    _img(root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png")
    _img(root / "bottle" / "ground_truth" / "contamination" / "000_mask.png")
    (root / "bottle" / "license.txt").write_text("x")
    (root / "bottle" / "test" / "good" / "Thumbs.db").write_text("x")
    _img(root / "metal_nut" / "train" / "good" / "000.png")
    _img(root / "metal_nut" / "test" / "good" / "000.png")
    _img(root / "only_train" / "train" / "good" / "000.png")
    (root / "docs").mkdir()
    (root / "readme.txt").write_text("not a category")
    return root


@pytest.fixture
def visa_root(tmp_path: Path) -> Path:
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for cat in ("candle", "pcb1"):
        for i in range(4):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            _img(root / rel)
            rows.append(f"{cat},train,normal,{rel},")
        rel = f"{cat}/Data/Images/Normal/0100.JPG"
        _img(root / rel)
        rows.append(f"{cat},test,normal,{rel},")
        for i in range(2):
            rel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG"
            mask = f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            _img(root / rel)
            _img(root / mask)
            rows.append(f"{cat},test,anomaly,{rel},{mask}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    root = tmp_path / "my_widget"
    _img(root / "good" / "g1.png")
    _img(root / "good" / "g2.jpg")
    _img(root / "scratch" / "s1.png")
    _img(root / "scratch" / "s2.png")
    _img(root / "dent" / "d1.png")
    _img(root / "ground_truth" / "scratch" / "s1.png")
    _img(root / "ground_truth" / "scratch" / "s2_mask.png")
    for i in range(3):
        _img(root / "train" / "good" / f"t{i}.png")
    return root


# --------------------------------------------------------------------------------------------------- MVTec


def test_mvtec_test_split(mvtec_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vlad.data.datasets"):
        samples = load_mvtec(mvtec_root, "bottle")
    assert [(s.defect, s.path.name, s.label) for s in samples] == [
        ("broken_large", "000.png", 1),
        ("broken_large", "001.png", 1),
        ("contamination", "000.png", 1),
        ("good", "000.png", 0),
        ("good", "001.png", 0),
    ]
    assert all(s.category == "bottle" and s.split == "test" for s in samples)
    masks = {(s.defect, s.path.name): s.mask_path for s in samples}
    assert masks[("broken_large", "000.png")] == mvtec_root / "bottle/ground_truth/broken_large/000_mask.png"
    assert masks[("broken_large", "001.png")] is None
    assert masks[("good", "000.png")] is None
    assert any("no mask" in r.getMessage() and "001.png" in r.getMessage() for r in caplog.records)


def test_mvtec_train_split(mvtec_root: Path) -> None:
    samples = load_mvtec(mvtec_root, ["bottle"], split="train")
    assert len(samples) == 10
    assert all(s.label == 0 and s.defect == "good" and s.split == "train" and s.mask_path is None for s in samples)


def test_mvtec_all_categories(mvtec_root: Path) -> None:
    assert list_categories(mvtec_root, "mvtec") == ["bottle", "metal_nut", "only_train"]
    samples = load_dataset(mvtec_root, "mvtec")  # only_train contributes nothing to the test split
    assert {s.category for s in samples} == {"bottle", "metal_nut"}
    assert len(samples) == 6


def test_mvtec_empty_result(mvtec_root: Path) -> None:
    with pytest.raises(DatasetError, match=r"no test images found in .*mvtec.*only_train"):
        load_mvtec(mvtec_root, "only_train")


def test_mvtec_unknown_category_lists_available(mvtec_root: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown category 'screw'.*available: bottle, metal_nut, only_train"):
        load_dataset(mvtec_root, "mvtec", categories=["bottle", "screw"])


def test_mvtec_no_categories(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError, match="no categories found"):
        load_mvtec(tmp_path)


# --------------------------------------------------------------------------------------------------- VisA


def test_visa_test_split(visa_root: Path) -> None:
    samples = load_visa(visa_root, "pcb1")
    assert [s.label for s in samples] == [0, 1, 1]
    normal, bad = samples[0], samples[1]
    assert normal.defect == "good"
    assert normal.mask_path is None
    assert bad.defect == "anomaly"
    assert bad.mask_path == visa_root / "pcb1/Data/Masks/Anomaly/000.png"
    assert bad.path == visa_root / "pcb1/Data/Images/Anomaly/000.JPG"
    assert all(s.category == "pcb1" and s.split == "test" for s in samples)


def test_visa_train_and_dispatch(visa_root: Path) -> None:
    assert list_categories(visa_root, "visa") == ["candle", "pcb1"]
    train = load_dataset(visa_root, "visa", split="train")
    assert len(train) == 8
    assert all(s.label == 0 for s in train)
    assert [s.category for s in train] == ["candle"] * 4 + ["pcb1"] * 4


def test_visa_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"VisA split file not found: .*split_csv/1cls\.csv"):
        load_visa(tmp_path)


def test_visa_custom_csv_and_bad_label(visa_root: Path) -> None:
    rel = "candle/Data/Images/Normal/0000.JPG"
    (visa_root / "other.csv").write_text(f"object,split,label,image,mask\ncandle,test,weird,{rel},\n")
    with pytest.raises(DatasetError, match=r"label 'weird'.*allowed: normal, anomaly"):
        load_visa(visa_root, split_csv="other.csv")


def test_visa_missing_columns(visa_root: Path) -> None:
    (visa_root / "bad.csv").write_text("object,split,image\ncandle,test,x.png\n")
    with pytest.raises(DatasetError, match=r"bad\.csv lacks column\(s\) label, mask"):
        load_visa(visa_root, split_csv="bad.csv")


def test_visa_missing_image(visa_root: Path) -> None:
    (visa_root / "pcb1/Data/Images/Anomaly/001.JPG").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) listed .* missing .*001\.JPG"):
        load_visa(visa_root, "pcb1")


# --------------------------------------------------------------------------------------------------- folder


def test_folder_test_split(folder_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vlad.data.datasets"):
        samples = load_folder(folder_root)
    assert [(s.defect, s.path.name, s.label) for s in samples] == [
        ("dent", "d1.png", 1),
        ("good", "g1.png", 0),
        ("good", "g2.jpg", 0),
        ("scratch", "s1.png", 1),
        ("scratch", "s2.png", 1),
    ]
    assert all(s.category == "my_widget" for s in samples)
    masks = {s.path.name: s.mask_path for s in samples}
    assert masks["s1.png"] == folder_root / "ground_truth/scratch/s1.png"
    assert masks["s2.png"] == folder_root / "ground_truth/scratch/s2_mask.png"
    assert masks["d1.png"] is None
    assert any("d1.png" in r.getMessage() for r in caplog.records)


def test_folder_category_and_train(folder_root: Path) -> None:
    assert {s.category for s in load_folder(folder_root, category="widget")} == {"widget"}
    train = load_folder(folder_root, split="train")
    assert [s.path.name for s in train] == ["t0.png", "t1.png", "t2.png"]


def test_folder_train_without_good_subfolder(tmp_path: Path) -> None:
    root = tmp_path / "part"
    _img(root / "good" / "a.png")
    _img(root / "train" / "r.png")
    assert [s.path.name for s in load_folder(root, split="train")] == ["r.png"]


def test_folder_dispatch_and_categories(folder_root: Path) -> None:
    assert list_categories(folder_root, "folder") == ["my_widget"]
    assert len(load_dataset(folder_root, "folder", categories="my_widget")) == 5
    with pytest.raises(DatasetError, match=r"unknown category 'bolt'.*available: my_widget"):
        load_dataset(folder_root, "folder", categories=["bolt"])


def test_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "good").mkdir()
    with pytest.raises(DatasetError, match="no test images found"):
        load_folder(tmp_path)
    with pytest.raises(DatasetError, match="no train images found"):
        load_folder(tmp_path, split="train")


# --------------------------------------------------------------------------------------------------- common errors


def test_unknown_layout(mvtec_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset layout 'coco'; allowed: mvtec, visa, folder"):
        load_dataset(mvtec_root, "coco")
    with pytest.raises(ConfigError, match="allowed: mvtec, visa, folder"):
        list_categories(mvtec_root, "coco")


def test_unknown_split(mvtec_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset split 'val'; allowed: train, test"):
        load_dataset(mvtec_root, "mvtec", split="val")


@pytest.mark.parametrize("layout", ["mvtec", "visa", "folder"])
def test_missing_root(tmp_path: Path, layout: str) -> None:
    with pytest.raises(DatasetError, match=r"dataset root not found: .*nowhere"):
        load_dataset(tmp_path / "nowhere", layout)


def test_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(tmp_path / "f.txt", "mvtec")


# --------------------------------------------------------------------------------------------------- references


def test_reference_images_deterministic(mvtec_root: Path) -> None:
    first = reference_images(mvtec_root, "mvtec", "bottle", 3, seed=7)
    assert first == reference_images(mvtec_root, "mvtec", "bottle", 3, seed=7)
    candidates = sorted((mvtec_root / "bottle/train/good").glob("*.png"))
    assert first == random.Random(7).sample(candidates, 3)
    assert len(set(first)) == 3
    assert reference_images(mvtec_root, "mvtec", "bottle", 0) == []


def test_reference_images_too_few(mvtec_root: Path) -> None:
    with pytest.raises(DatasetError, match=r"only 10 normal training image\(s\) exist for category 'bottle'.*k=11"):
        reference_images(mvtec_root, "mvtec", "bottle", 11)
    (mvtec_root / "no_train" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="only 0 normal training image"):
        reference_images(mvtec_root, "mvtec", "no_train", 1)


def test_reference_images_bad_k_and_category(mvtec_root: Path) -> None:
    with pytest.raises(ConfigError, match="non-negative integer"):
        reference_images(mvtec_root, "mvtec", "bottle", -1)
    with pytest.raises(DatasetError, match="unknown category 'nope'"):
        reference_images(mvtec_root, "mvtec", "nope", 1)


def test_reference_images_other_layouts(visa_root: Path, folder_root: Path) -> None:
    visa = reference_images(visa_root, "visa", "pcb1", 2, seed=1)
    assert len(visa) == 2
    assert all("Normal" in p.parts for p in visa)
    folder = reference_images(folder_root, "folder", "my_widget", 3)
    assert sorted(p.name for p in folder) == ["t0.png", "t1.png", "t2.png"]


# --------------------------------------------------------------------------------------------------- misc


def test_prompt_name() -> None:
    assert prompt_name("pcb3") == "printed circuit board"
    assert prompt_name("macaroni2") == "macaroni"
    assert prompt_name("pipe_fryum") == "pipe fryum"
    assert prompt_name("metal_nut") == "metal nut"
    assert prompt_name("bottle") == "bottle"
    assert len(VISA_CLASS_NAMES) == 12


def test_sample_is_frozen() -> None:
    s = Sample(Path("a.png"), "c", 0, "good", None, "test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.label = 1  # type: ignore[misc]
