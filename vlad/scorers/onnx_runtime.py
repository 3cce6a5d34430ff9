"""Run a model exported by :mod:`vlad.export` with onnxruntime: the ``onnx:DIR`` backbone spec.

``get_scorer("winclip", backbone="onnx:DIR")`` (and ``--backbone onnx:DIR``, ``Detector(..., backbone="onnx:DIR")``,
the web UI's backbone field) builds an :class:`OnnxScorer`: the scorer contract the pipeline uses
(:class:`~vlad.scorers.base.Scorer`: ``score_many``, ``thresholds``, ``describe``, ``warnings``, ...) with the graph
run by onnxruntime (``CPUExecutionProvider`` by default) and the rest redone from the manifest with numpy and Pillow,
as the torch scorer does it: bicubic resize and CLIP normalisation, the map resized bilinearly to each image,
thresholds (the baked ones, then a user threshold and the sensitivity), regions. Neither torch nor open_clip is
imported.

What was baked in cannot change: the product (another ``object_name`` is an error naming the baked one; the unnamed
default ``object`` means the exported product), the references (``fit`` is an error), the prompts, concept transform
and adapter (concept rules report "not applicable", an adapter is an error). Region rules (size, position, count)
apply to the results as usual.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from vlad._optional import require
from vlad.backbones.spec import ONNX_PREFIX
from vlad.data.images import ImageLike, as_pil
from vlad.errors import ConfigError
from vlad.resources import file_sha256
from vlad.result import AnomalyResult
from vlad.thresholds import Thresholds, check_sensitivity

logger = logging.getLogger(__name__)

MODEL_FILE, MANIFEST_FILE, MANIFEST_FORMAT = "model.onnx", "manifest.json", "vlad-onnx-export"
INPUT_NAME, OUTPUT_NAMES = "images", ("scores", "maps")
UNNAMED = "object"
"""The product name vlad uses when none is given; for an export it means the exported product."""
_FIXED = ("concepts", "detector", "dattn")
"""Scorer options the export fixed: a value other than the manifest's is an error."""


@dataclass(frozen=True)
class ExportedBackbone:
    """What results and the pipeline read of a scorer's backbone (no CLIP here: region concepts and explanations
    that need one say so).

    Attributes:
        spec: ``onnx:DIR`` as given.
        exported: the CLIP backbone spec the graph was traced from.
        is_random: the exported CLIP had random weights.
        device: where onnxruntime runs (``cpu`` or ``cuda``).
    """

    spec: str
    exported: str
    is_random: bool
    device: str = "cpu"


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, with its model file's SHA-256 verified.

    Raises:
        ConfigError: no such folder, no manifest or model, not a vlad export, or a model file that changed.
    """
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{ONNX_PREFIX}{directory}: no such folder (make one with vlad export --format onnx)")
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{folder} has no {MANIFEST_FILE}: not a vlad export (vlad export --format onnx)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{path} is not a vlad ONNX export manifest (format {MANIFEST_FORMAT!r})")
    model = folder / MODEL_FILE
    if not model.is_file():
        raise ConfigError(f"{folder} has a manifest but no {MODEL_FILE}")
    if file_sha256(model) != manifest["model"]["sha256"]:
        raise ConfigError(f"{model} does not match the SHA-256 in its manifest: the file changed since the export")
    return manifest


class OnnxScorer:
    """An exported scorer for one product, run by onnxruntime (see the module docstring).

    Args:
        name: the scorer name asked for; it must be the manifest's.
        directory: the export folder (``DIR`` of ``onnx:DIR``).
        device: ``auto`` or ``cpu`` (CPUExecutionProvider), ``cuda`` (CUDAExecutionProvider, when installed).
        threshold: a user threshold in raw score units; default: the one given at export, if any.
        sensitivity: in [0, 1]; default: the one given at export.
        batch_size: images per graph run.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        precision, image_size, profile, concepts, detector, dattn: accepted when they agree with the manifest (the
            command line passes them all), else a ConfigError naming the exported value.
    """

    transductive: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        directory: str | Path,
        *,
        device: str = "auto",
        precision: str = "auto",
        image_size: int | None = None,
        threshold: float | None = None,
        sensitivity: float | None = None,
        batch_size: int = 8,
        profile: str | None = None,
        threads: int | None = None,
        spec: str | None = None,
        tile: int | str | None = None,
        tile_overlap: float | None = None,
        **fixed: Any,
    ) -> None:
        self.directory = Path(directory).expanduser()
        m = self.manifest = read_manifest(self.directory)
        self.name = m["scorer"]
        self._check_settings(name, precision, image_size, profile, batch_size, fixed)
        if tile is not None:
            raise ConfigError(f"--tile: the {self.name} export in {self.directory} scores whole images only")
        self.tiling = None
        self.session = _session(self.directory / MODEL_FILE, device, threads)
        device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        spec = spec or f"{ONNX_PREFIX}{directory}"
        self.backbone = ExportedBackbone(spec, m["backbone"], m["random_weights"], device)
        self.object_name: str = m["object"]
        self.profile: str = m["profile"]
        self.image_size: int = m["image_size"]
        self.grid = tuple(m["grid"])
        self.batch_size = batch_size
        self.user_threshold = m.get("user_threshold") if threshold is None else threshold
        self.sensitivity = m.get("sensitivity", 0.5) if sensitivity is None else sensitivity
        check_sensitivity(self.sensitivity)
        self.adapter: str | None = m.get("adapter")
        self.transform = None
        self.ensemble = None
        self.rules_state: dict[str, Any] = {}
        self.baked = (
            f"the {self.name} export in {self.directory} has its prompts, feature transform, adapter and references "
            "baked in (export again to change them)"
        )

    # ------------------------------------------------------------------ checks
    def _check_settings(
        self, name: str, precision: str, image_size: int | None, profile: str | None, batch: int, fixed: dict
    ) -> None:
        m = self.manifest
        where = f"{self.directory} holds a {m['scorer']} export for object {m['object']!r} ({m['backbone']})"
        if name != m["scorer"]:
            raise ConfigError(f"{where}; it cannot run as scorer {name!r}: use --scorer {m['scorer']}")
        for option, value, baked in (("profile", profile, m["profile"]), ("image_size", image_size, m["image_size"])):
            if value is not None and value != baked:
                raise ConfigError(f"{where} with {option} {baked!r}; {option} {value!r} needs another export")
        if precision not in ("auto", "fp32"):
            raise ConfigError(f"{where} in fp32; precision {precision!r} needs another export")
        if batch < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch}")
        unknown = sorted(set(fixed) - set(_FIXED))
        if unknown:
            raise ConfigError(f"{where}; option(s) {', '.join(unknown)} are fixed at export: export again with them")
        for option in _FIXED:
            value, baked = fixed.get(option), m.get(option)
            if option == "concepts" and value is not None and not str(value).strip():
                value = None
            if value is not None and value != baked and not (option == "concepts" and _same_concepts(value, baked)):
                raise ConfigError(f"{where} with {option} {baked!r}; {option} {value!r} needs another export")

    def _check_object(self, object_name: str) -> None:
        """Another product than the exported one is an error; ``object`` (what vlad scores when no product is
        named) stands for the exported one."""
        if object_name not in (self.object_name, UNNAMED):
            raise ConfigError(
                f"{self.directory} was exported for object {self.object_name!r} (scorer {self.name}); it cannot "
                f"score {object_name!r}: export again with --object {object_name}"
            )

    # ------------------------------------------------------------------ references (baked in)
    @property
    def few_shot(self) -> bool:
        return self.n_references > 0

    @property
    def n_references(self) -> int:
        return int(self.manifest["references"])

    def fit(self, references: Sequence[ImageLike]) -> OnnxScorer:
        """Always a ConfigError: the references (and the thresholds calibrated on them) are baked into the export."""
        n = self.n_references
        held = f"holds its {n} references" if n else "is zero-shot (no references)"
        raise ConfigError(f"the {self.name} export in {self.directory} {held}: export again with --refs to change them")

    def clear_references(self) -> OnnxScorer:
        """Nothing to do for a zero-shot export; a ConfigError for a few-shot one (its references are in the graph)."""
        if self.few_shot:
            raise ConfigError(
                f"the {self.name} export in {self.directory} has its {self.n_references} references baked in and "
                "cannot score zero-shot: export again without --refs"
            )
        return self

    def set_transform(self, transform: Any, *, references: Sequence[ImageLike] | None = None) -> None:
        raise ConfigError(f"{self.baked}: a feature transform cannot be set")

    def invalidate_calibration(self) -> None:
        """Nothing to forget: the thresholds were fixed at export."""

    # ------------------------------------------------------------------ scoring
    def thresholds(self, object_name: str, *, tiled: bool = False) -> Thresholds:
        """The thresholds baked at export (default or calibrated), then the user threshold and the sensitivity
        (exports score whole images: ``tiled`` is always False here)."""
        self._check_object(object_name.strip() or "object")
        base = Thresholds(**self.manifest["thresholds"])
        if self.user_threshold is not None:
            base = base.with_user_threshold(self.user_threshold)
        return base.with_sensitivity(self.sensitivity)

    def score(self, image: ImageLike, object_name: str = "object") -> AnomalyResult:
        return self.score_many([image], object_name)[0]

    def score_many(self, images: Sequence[ImageLike], object_name: str = "object") -> list[AnomalyResult]:
        """Score images of the exported product in batches (another product is a ConfigError)."""
        object_name = object_name.strip() or "object"
        th = self.thresholds(object_name)
        pil = [as_pil(im) for im in images]
        results: list[AnomalyResult] = []
        for start in range(0, len(pil), self.batch_size):
            batch = pil[start : start + self.batch_size]
            t0 = time.perf_counter()
            x = self.preprocess(batch)
            t1 = time.perf_counter()
            scores, maps = self.run_graph(x)
            t2 = time.perf_counter()
            timings = {"preprocess": (t1 - t0) / len(batch), "model": (t2 - t1) / len(batch)}
            for im, s, m in zip(batch, scores, maps, strict=True):
                t_start = time.perf_counter()
                results.append(self._result(float(s), resize_bilinear(m, im.size), th, timings, t_start))
        return results

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, 3, S, S) float32: bicubic resize to S x S (aspect not kept), /255, CLIP mean and std (the manifest's)."""
        p = self.manifest["preprocess"]
        size = tuple(p["size"])
        arrays = [np.asarray(im.convert("RGB").resize(size, Image.Resampling.BICUBIC)) for im in images]
        x = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        mean = np.asarray(p["mean"], np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(p["std"], np.float32).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    def run_graph(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) preprocessed -> raw scores (B,) and maps (B, h, w) from onnxruntime."""
        scores, maps = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return scores, maps

    def _result(self, score: float, amap: np.ndarray, th: Thresholds, timings: dict, t_start: float) -> AnomalyResult:
        decided = th.fields_for(score, amap)
        return AnomalyResult(
            pred_score=score,
            anomaly_map=amap,
            **decided,
            scorer=self.name,
            backbone=self.backbone.spec,
            timings={**timings, "postprocess": time.perf_counter() - t_start},
            warnings=self.warnings(),
            meta={
                "pixel_scale": th.pixel_scale,
                "image_size": self.image_size,
                "references": self.n_references,
                "sensitivity": th.sensitivity,
                "adapter": self.adapter,
                "profile": self.profile,
            },
        )

    # ------------------------------------------------------------------ reports
    def warnings(self) -> tuple[str, ...]:
        """The warnings the torch scorer's results carried at export (random weights, rough calibration, ...)."""
        return tuple(self.manifest.get("warnings", ()))

    def prompt_phrases(self, object_name: str) -> list[str]:
        return list(self.manifest.get("prompt_phrases", ())) if object_name in (self.object_name, UNNAMED) else []

    def describe(self) -> dict[str, Any]:
        """The export's settings, with the runtime's backbone spec, threshold and sensitivity."""
        m = self.manifest
        return {
            **m.get("settings", {}),
            "scorer": self.name,
            "backbone": self.backbone.spec,
            "sensitivity": self.sensitivity,
            "threshold": self.user_threshold,
            "runtime": f"onnxruntime ({self.session.get_providers()[0]})",
            "export": {"object": self.object_name, "backbone": m["backbone"], "sha256": m["model"]["sha256"]},
        }


def _same_concepts(given: Any, baked: Any) -> bool:
    """The command line passes ``--concepts`` words; the manifest holds the transform's description, which starts
    with them."""
    return isinstance(baked, str) and baked.startswith(str(given).strip())


def _session(model: Path, device: str, threads: int | None) -> Any:
    ort = require("onnxruntime", "onnx", what=f"--backbone {ONNX_PREFIX}DIR")
    if device in ("auto", "cpu"):
        providers = ["CPUExecutionProvider"]
    elif device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError(f"device {device!r}: this onnxruntime has no CUDAExecutionProvider (use cpu)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        raise ConfigError(f"unknown device {device!r} for an ONNX export; allowed: auto, cpu, cuda")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model), sess_options=options, providers=providers)


def resize_bilinear(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) -> (H, W) float32 bilinear resize with ``align_corners=False`` (torch's ``F.interpolate``), for
    ``size = (W, H)`` as PIL gives it."""
    width, height = size
    m = np.asarray(m, dtype=np.float32)
    rows = _axis_weights(m.shape[0], height)
    cols = _axis_weights(m.shape[1], width)
    out = _interp(_interp(m, *rows, axis=0), *cols, axis=1)
    return out.astype(np.float32)


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and the weight of i1 for each output index, as torch computes them."""
    scale = np.float32(n_in / n_out)
    src = ((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)).clip(min=0)
    i0 = np.floor(src).astype(np.int64).clip(max=n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _interp(m: np.ndarray, i0: np.ndarray, i1: np.ndarray, w1: np.ndarray, *, axis: int) -> np.ndarray:
    a, b = np.take(m, i0, axis=axis), np.take(m, i1, axis=axis)
    w = w1[:, None] if axis == 0 else w1[None, :]
    return a * (np.float32(1.0) - w) + b * w
