"""Dataset indexing for MVTec AD, VisA and plain good/defect folders.

Loaders only list files (no pixels are read); they return :class:`Sample` records that evaluation code turns into
images with :func:`vlad.data.images.load_image` and masks with :func:`vlad.data.images.load_mask`.
"""

from __future__ import annotations

import csv
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vlad.data.images import IMAGE_EXTENSIONS
from vlad.errors import ConfigError, DatasetError

__all__ = [
    "LAYOUTS",
    "SPLITS",
    "VISA_CLASS_NAMES",
    "VISA_SPLIT_CSV",
    "Sample",
    "list_categories",
    "load_dataset",
    "load_folder",
    "load_mvtec",
    "load_visa",
    "prompt_name",
    "reference_images",
]

logger = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("mvtec", "visa", "folder")
"""Dataset layouts understood by :func:`load_dataset`."""

SPLITS: tuple[str, ...] = ("train", "test")
"""Dataset splits: ``train`` holds normal reference images only, ``test`` holds normal and anomalous images."""

VISA_SPLIT_CSV = "split_csv/1cls.csv"
"""Default VisA split file, relative to the VisA root."""

VISA_CLASS_NAMES: dict[str, str] = {
    "candle": "candle",
    "capsules": "capsules",
    "cashew": "cashew",
    "chewinggum": "chewing gum",
    "fryum": "fryum",
    "macaroni1": "macaroni",
    "macaroni2": "macaroni",
    "pcb1": "printed circuit board",
    "pcb2": "printed circuit board",
    "pcb3": "printed circuit board",
    "pcb4": "printed circuit board",
    "pipe_fryum": "pipe fryum",
}
"""VisA category folder names mapped to the object names used in text prompts."""

_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_VISA_LABELS = {"normal": 0, "anomaly": 1}
_FOLDER_RESERVED = frozenset({"ground_truth", "train"})
_GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One dataset image.

    Attributes:
        path: Image file.
        category: Object/texture category (e.g. ``"bottle"``).
        label: 0 for normal, 1 for anomalous.
        defect: Defect type; ``"good"`` for normal images (VisA: the ``image_anno.csv`` label(s), comma-separated, or
            ``"anomaly"`` without that file).
        mask_path: Ground-truth mask file, or None (normal images, or an anomalous image whose mask is missing).
        split: ``"train"`` or ``"test"``.
    """

    path: Path
    category: str
    label: int
    defect: str
    mask_path: Path | None
    split: str


def prompt_name(category: str) -> str:
    """Object name to put in text prompts for a category folder name.

    Args:
        category: Category folder name, e.g. ``"pcb1"`` or ``"metal_nut"``.

    Returns:
        The VisA object name for VisA categories (``"pcb1"`` -> ``"printed circuit board"``), otherwise the name with
        underscores replaced by spaces (``"metal_nut"`` -> ``"metal nut"``).
    """
    return VISA_CLASS_NAMES.get(category, category.replace("_", " ").strip())


def load_dataset(
    root: str | Path, layout: str, categories: str | Sequence[str] | None = None, split: str = "test"
) -> list[Sample]:
    """Index a dataset of the given layout.

    Args:
        root: Dataset root (for ``"folder"``, the category folder itself).
        layout: One of ``LAYOUTS``: ``"mvtec"``, ``"visa"`` or ``"folder"``.
        categories: Category name(s) to load; None loads all.
        split: ``"test"`` (normal and anomalous images) or ``"train"`` (normal reference images).

    Returns:
        Samples sorted by category, defect and file name (VisA: CSV order within a category).

    Raises:
        ConfigError: Unknown layout or split.
        DatasetError: Missing root, unknown category, malformed layout, or no images found.
    """
    layout = _check_layout(layout)
    if layout == "mvtec":
        return load_mvtec(root, categories, split)
    if layout == "visa":
        return load_visa(root, categories, split)
    root_path = _check_root(root, layout)
    cats = _select_categories(categories, list_categories(root_path, layout), root_path, layout)
    return load_folder(root_path, cats[0], split)


def list_categories(root: str | Path, layout: str) -> list[str]:
    """Category names available in a dataset.

    Args:
        root: Dataset root.
        layout: One of ``LAYOUTS``.

    Returns:
        Sorted category names: MVTec subfolders holding ``train/`` or ``test/``; the ``object`` values of the VisA
        split CSV; ``[root folder name]`` for the folder layout.

    Raises:
        ConfigError: Unknown layout.
        DatasetError: Missing root, or (VisA) missing/malformed split CSV.
    """
    layout = _check_layout(layout)
    root_path = _check_root(root, layout)
    if layout == "mvtec":
        return _mvtec_categories(root_path)
    if layout == "visa":
        return sorted({row["object"] for row in _read_visa_csv(root_path, VISA_SPLIT_CSV)})
    return [_folder_name(root_path)]


def load_mvtec(root: str | Path, categories: str | Sequence[str] | None = None, split: str = "test") -> list[Sample]:
    """Index an MVTec AD style dataset.

    Layout: ``root/<category>/train/good/*``, ``root/<category>/test/<defect>/*`` (``good`` = normal) and
    ``root/<category>/ground_truth/<defect>/<stem>_mask.png``. An anomalous image without a mask gets
    ``mask_path=None`` and a warning is logged (pixel metrics skip it).

    Args:
        root: Dataset root holding one folder per category.
        categories: Category name(s); None loads all.
        split: ``"test"`` or ``"train"`` (``train/good`` only).

    Returns:
        Samples sorted by category, defect and file name.

    Raises:
        ConfigError: Unknown split.
        DatasetError: Missing root, unknown category or no images found.
    """
    root_path = _check_root(root, "mvtec")
    split = _check_split(split)
    cats = _select_categories(categories, _mvtec_categories(root_path), root_path, "mvtec")
    samples = [s for cat in cats for s in _mvtec_samples(root_path / cat, cat, split)]
    return _non_empty(samples, root_path, "mvtec", split, cats)


def load_visa(
    root: str | Path,
    categories: str | Sequence[str] | None = None,
    split: str = "test",
    split_csv: str | Path = VISA_SPLIT_CSV,
) -> list[Sample]:
    """Index a VisA dataset through its split CSV.

    The CSV has columns ``object,split,label,image,mask``; ``label`` is ``normal`` or ``anomaly``; ``image`` and
    ``mask`` are relative to ``root`` and ``mask`` is empty for normal images. Anomalous samples get their defect
    label from the category's ``image_anno.csv`` (VisA's per-image labels, several ones comma-separated, e.g.
    ``"chunk of wax missing,different colour spot"``) when the folder has one, else ``defect="anomaly"``.

    Args:
        root: VisA root (holding ``split_csv/`` and one folder per category).
        categories: Category name(s); None loads all.
        split: ``"test"`` or ``"train"``.
        split_csv: Split file, relative to ``root`` (or absolute).

    Returns:
        Samples in CSV order, grouped by category in sorted category order.

    Raises:
        ConfigError: Unknown split.
        DatasetError: Missing root, missing or malformed CSV, unknown category, listed images missing, or no images.
    """
    root_path = _check_root(root, "visa")
    split = _check_split(split)
    rows = _read_visa_csv(root_path, split_csv)
    cats = _select_categories(categories, sorted({r["object"] for r in rows}), root_path, "visa")
    samples = [s for cat in cats for s in _visa_samples(root_path, rows, cat, split)]
    _check_exist(samples, root_path)
    return _non_empty(samples, root_path, "visa", split, cats)


def load_folder(root: str | Path, category: str | None = None, split: str = "test") -> list[Sample]:
    """Index a plain folder of good and defective images of one category.

    Layout: ``root/good/*`` (normal), ``root/<defect>/*`` for any other subfolder except ``ground_truth`` and
    ``train`` (anomalous), optional masks ``root/ground_truth/<defect>/<stem>_mask.png`` or ``<stem>.png``, and
    optional normal references in ``root/train/good/`` (or directly in ``root/train/``) for ``split="train"``.

    Args:
        root: The category folder.
        category: Category name stored in the samples; defaults to the folder's name.
        split: ``"test"`` or ``"train"``.

    Returns:
        Samples sorted by defect and file name.

    Raises:
        ConfigError: Unknown split.
        DatasetError: Missing root or no images found.
    """
    root_path = _check_root(root, "folder")
    split = _check_split(split)
    cat = category if category else _folder_name(root_path)
    return _non_empty(_folder_samples(root_path, cat, split), root_path, "folder", split, [cat])


def reference_images(root: str | Path, layout: str, category: str, k: int, seed: int = 0) -> list[Path]:
    """Pick ``k`` normal training images of a category as few-shot references.

    The selection is deterministic: the candidate paths are sorted, then ``random.Random(seed).sample(paths, k)``.

    Args:
        root: Dataset root.
        layout: One of ``LAYOUTS``.
        category: Category name.
        k: Number of references (0 returns an empty list).
        seed: Random seed.

    Returns:
        ``k`` image paths, in sampled order.

    Raises:
        ConfigError: Unknown layout, or ``k`` is not a non-negative integer.
        DatasetError: Missing root, unknown category, or fewer than ``k`` normal training images.
    """
    layout = _check_layout(layout)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"few-shot k must be a non-negative integer, got {k!r}")
    root_path = _check_root(root, layout)
    cat = _select_categories(category, list_categories(root_path, layout), root_path, layout)[0]
    paths = sorted(s.path for s in _train_samples(root_path, layout, cat) if s.label == 0)
    if len(paths) < k:
        raise DatasetError(
            f"only {len(paths)} normal training image(s) exist for category {cat!r} in {root_path} ({layout} layout), "
            f"but k={k} few-shot references were requested"
        )
    return random.Random(seed).sample(paths, k)


# --------------------------------------------------------------------------------------------------- validation


def _check_layout(layout: str) -> str:
    """Return ``layout`` if known, else raise ConfigError listing the allowed values."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown dataset layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    return layout


def _check_split(split: str) -> str:
    """Return ``split`` if known, else raise ConfigError listing the allowed values."""
    if split not in SPLITS:
        raise ConfigError(f"unknown dataset split {split!r}; allowed: {', '.join(SPLITS)}")
    return split


def _check_root(root: str | Path, layout: str) -> Path:
    """Return ``root`` as a Path if it is an existing directory, else raise DatasetError."""
    p = Path(root)
    if not p.exists():
        raise DatasetError(f"dataset root not found: {p} ({layout} layout)")
    if not p.is_dir():
        raise DatasetError(f"dataset root is not a directory: {p} ({layout} layout)")
    return p


def _select_categories(
    requested: str | Sequence[str] | None, available: list[str], root: Path, layout: str
) -> list[str]:
    """Validate requested categories against the available ones; None selects all."""
    if not available:
        raise DatasetError(f"no categories found in {root} for the {layout} layout ({_layout_hint(layout)})")
    if requested is None:
        return list(available)
    wanted = [requested] if isinstance(requested, str) else list(requested)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DatasetError(
            f"unknown category {unknown[0]!r} in {root} ({layout} layout); available: {', '.join(available)}"
        )
    return list(dict.fromkeys(wanted))


def _layout_hint(layout: str) -> str:
    """One-phrase description of what a layout expects."""
    return {
        "mvtec": "expected <root>/<category>/train/ or <root>/<category>/test/",
        "visa": f"expected object names in <root>/{VISA_SPLIT_CSV}",
        "folder": "expected <root>/good/ and <root>/<defect>/ folders",
    }[layout]


def _non_empty(samples: list[Sample], root: Path, layout: str, split: str, cats: list[str]) -> list[Sample]:
    """Return ``samples`` or raise DatasetError if there are none."""
    if not samples:
        raise DatasetError(
            f"no {split} images found in {root} ({layout} layout, categories: {', '.join(cats)}; "
            f"{_layout_hint(layout)})"
        )
    return samples


def _train_samples(root: Path, layout: str, category: str) -> list[Sample]:
    """Training samples of one category, possibly empty."""
    if layout == "mvtec":
        return _mvtec_samples(root / category, category, "train")
    if layout == "visa":
        return _visa_samples(root, _read_visa_csv(root, VISA_SPLIT_CSV), category, "train")
    return _folder_samples(root, category, "train")


# --------------------------------------------------------------------------------------------------- file listing


def _folder_name(root: Path) -> str:
    """Name of a folder, resolving ``.`` and similar."""
    return root.name or root.resolve().name


def _subdirs(directory: Path) -> list[Path]:
    """Sorted non-hidden subdirectories; empty if ``directory`` does not exist."""
    if not directory.is_dir():
        return []
    return sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(directory: Path) -> list[Path]:
    """Sorted non-hidden image files directly inside ``directory``; empty if it does not exist."""
    if not directory.is_dir():
        return []
    return sorted(
        f
        for f in directory.iterdir()
        if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".") and f.is_file()
    )


def _mask_index(gt_dir: Path) -> dict[str, Path]:
    """File name -> path for the files in a ground-truth folder (empty if missing)."""
    if not gt_dir.is_dir():
        return {}
    return {f.name: f for f in gt_dir.iterdir() if f.is_file()}


def _find_mask(index: dict[str, Path], stem: str) -> Path | None:
    """Mask for an image stem: ``<stem>_mask.png`` first, then ``<stem>.png``, then other image extensions."""
    extensions = (".png",) + tuple(e for e in IMAGE_EXTENSIONS if e != ".png")
    for ext in extensions:
        for name in (f"{stem}_mask{ext}", f"{stem}{ext}"):
            if name in index:
                return index[name]
    return None


def _defect_samples(image_dir: Path, gt_root: Path, category: str, defect: str) -> list[Sample]:
    """Test samples of one defect folder; anomalous ones get their mask looked up in ``gt_root/defect``."""
    if defect == _GOOD:
        return [Sample(p, category, 0, _GOOD, None, "test") for p in _image_files(image_dir)]
    index = _mask_index(gt_root / defect)
    samples = [Sample(p, category, 1, defect, _find_mask(index, p.stem), "test") for p in _image_files(image_dir)]
    _warn_missing_masks(samples, gt_root / defect)
    return samples


def _warn_missing_masks(samples: list[Sample], gt_dir: Path) -> None:
    """Log one warning for the anomalous samples of a defect folder that have no mask."""
    missing = [s for s in samples if s.label == 1 and s.mask_path is None]
    if missing:
        logger.warning(
            "%d anomalous image(s) of category %r defect %r have no mask in %s (e.g. %s); pixel metrics will skip them",
            len(missing),
            missing[0].category,
            missing[0].defect,
            gt_dir,
            missing[0].path.name,
        )


# --------------------------------------------------------------------------------------------------- MVTec AD


def _mvtec_categories(root: Path) -> list[str]:
    """Subfolders of ``root`` that hold ``train/`` or ``test/``."""
    return [d.name for d in _subdirs(root) if (d / "train").is_dir() or (d / "test").is_dir()]


def _mvtec_samples(cat_dir: Path, category: str, split: str) -> list[Sample]:
    """Samples of one MVTec category and split (possibly empty)."""
    if split == "train":
        return [Sample(p, category, 0, _GOOD, None, "train") for p in _image_files(cat_dir / "train" / _GOOD)]
    gt_root = cat_dir / "ground_truth"
    return [s for d in _subdirs(cat_dir / "test") for s in _defect_samples(d, gt_root, category, d.name)]


# --------------------------------------------------------------------------------------------------- VisA


def _read_visa_csv(root: Path, split_csv: str | Path) -> list[dict[str, str]]:
    """Rows of the VisA split CSV with whitespace-stripped values.

    Raises:
        DatasetError: The CSV is missing or lacks one of the required columns.
    """
    path = root / split_csv
    if not path.is_file():
        raise DatasetError(f"VisA split file not found: {path} (expected the split CSV shipped with VisA)")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        missing = [c for c in _VISA_COLUMNS if c not in fields]
        if missing:
            raise DatasetError(
                f"VisA split file {path} lacks column(s) {', '.join(missing)}; required: {','.join(_VISA_COLUMNS)}"
            )
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    return [r for r in rows if r.get("object")]


def _visa_samples(root: Path, rows: list[dict[str, str]], category: str, split: str) -> list[Sample]:
    """Samples of one VisA category and split from the CSV rows (possibly empty)."""
    samples = []
    defects = _visa_defect_labels(root, category)
    for row in rows:
        if row["object"] != category or row["split"] != split:
            continue
        label = _visa_label(row, root)
        mask = root / row["mask"] if label == 1 and row["mask"] else None
        if mask is not None and not mask.is_file():
            mask = None
        defect = _GOOD if label == 0 else defects.get(_visa_key(row["image"], category), "anomaly")
        samples.append(Sample(root / row["image"], category, label, defect, mask, split))
    _warn_missing_masks(samples, root / category)
    return samples


def _visa_key(image: str, category: str) -> str:
    """An image path as written in a VisA CSV, without a leading ``<category>/`` (for matching the two CSVs)."""
    path = image.strip().replace("\\", "/").lstrip("./")
    return path[len(category) + 1 :] if path.startswith(category + "/") else path


def _visa_defect_labels(root: Path, category: str) -> dict[str, str]:
    """Image key -> defect label(s) from ``<root>/<category>/image_anno.csv`` (columns ``image,label,mask``); empty
    when the file is missing or unreadable (then the defect stays ``anomaly``)."""
    path = root / category / "image_anno.csv"
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        logger.warning("cannot read VisA defect labels from %s (%s); defects stay 'anomaly'", path, exc)
        return {}
    return {
        _visa_key(r["image"], category): r["label"]
        for r in rows
        if r.get("image") and r.get("label") and r["label"].lower() != "normal"
    }


def _visa_label(row: dict[str, str], root: Path) -> int:
    """0/1 label of a VisA CSV row; raises DatasetError for an unknown label."""
    label = row["label"].lower()
    if label not in _VISA_LABELS:
        raise DatasetError(
            f"VisA split file under {root} has label {row['label']!r} for {row['image']}; "
            f"allowed: {', '.join(_VISA_LABELS)}"
        )
    return _VISA_LABELS[label]


def _check_exist(samples: list[Sample], root: Path) -> None:
    """Raise DatasetError if image files listed by a split file are missing."""
    missing = [s.path for s in samples if not s.path.is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) listed in the VisA split file are missing under {root} (first: {missing[0]})"
        )


# --------------------------------------------------------------------------------------------------- plain folder


def _folder_samples(root: Path, category: str, split: str) -> list[Sample]:
    """Samples of a plain good/defect folder (possibly empty)."""
    if split == "train":
        train = root / "train"
        source = train / _GOOD if (train / _GOOD).is_dir() else train
        return [Sample(p, category, 0, _GOOD, None, "train") for p in _image_files(source)]
    gt_root = root / "ground_truth"
    defect_dirs = [d for d in _subdirs(root) if d.name not in _FOLDER_RESERVED]
    return [s for d in defect_dirs for s in _defect_samples(d, gt_root, category, d.name)]
