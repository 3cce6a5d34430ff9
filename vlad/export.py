"""Export one scorer for one fixed product to ONNX: what a deployed inspection station runs.

:func:`export_scorer` traces ``scorer._extract`` followed by ``scorer._score`` (see :mod:`vlad.scorers.base`) with
the product name, the text prototypes, the concept transform, an adapter's learned prompts or LoRA weights and the
few-shot reference memory held fixed, so they end up in the graph as constants. It writes:

- ``DIR/model.onnx``: input ``images`` (B, 3, S, S), float32, preprocessed (B is a dynamic axis); outputs
  ``scores`` (B,) raw image scores and ``maps`` (B, h, w) raw anomaly maps, on the model's patch grid or at the
  input size S, whichever the scorer's ``_score`` returns;
- ``DIR/manifest.json``: what was baked in and what stays outside the graph: the preprocessing (resize, mean, std),
  resizing each map to its image (and the scorer's ``_smooth``, none for the exportable scorers), the thresholds in
  force (the scorer's default or calibrated on the references) and the warnings every result carries.

:mod:`vlad.scorers.onnx_runtime` runs the pair with onnxruntime (``--backbone onnx:DIR``) and gives the same
results as the torch scorer. A scorer that has no fixed per-image graph is refused with one line saying why
(:meth:`~vlad.scorers.base.Scorer.export_refusal`: MuSc is transductive, FiLo's HQ-Loc runs an object detector).

Example:
    >>> manifest = export_onnx("winclip", "bottle", "export/bottle", backbone="random:tiny")  # doctest: +SKIP
    >>> manifest["model"]["sha256"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlad._optional import require
from vlad._version import __version__
from vlad.errors import ConfigError, VladError
from vlad.resources import file_sha256
from vlad.scorers.onnx_runtime import INPUT_NAME, MANIFEST_FILE, MANIFEST_FORMAT, MODEL_FILE, OUTPUT_NAMES

if TYPE_CHECKING:
    from vlad.data.images import ImageLike
    from vlad.scorers.base import Scorer

logger = logging.getLogger(__name__)

FORMATS = ("onnx",)
"""Export formats ``vlad export --format`` accepts."""
MANIFEST_VERSION = 1
DEFAULT_OPSET = 18
CHECK_TOLERANCE = 1e-3
"""Largest |difference| between the exported graph and torch on the export's check batches; more is an error."""


class ExportError(VladError):
    """The scorer could not be exported, or the exported graph disagrees with torch."""


def check_export(
    scorer: str, object_name: str | None, out: str | Path | None, options: dict[str, Any], *, has_references: bool
) -> Path:
    """Everything checkable before a model loads; returns the output folder (not created yet).

    Args:
        scorer: registry name.
        object_name: the product the export is for.
        out: the output folder (created by the export; an existing one must not hold an export already).
        options: the scorer's constructor keywords (``backbone``, ``profile``, ``detector``, ``dattn``, ...).
        has_references: whether few-shot references will be fitted.

    Raises:
        ConfigError: one line naming the problem (an unknown scorer raises UnknownScorerError).
    """
    from vlad.backbones.spec import is_onnx_spec
    from vlad.scorers import scorer_class, scorer_facts

    facts = scorer_facts(scorer)  # unknown names: UnknownScorerError listing the available ones
    if object_name is None or not object_name.strip():
        raise ConfigError("an export is for one product: name it, e.g. --object bottle")
    if out is None or not str(out).strip():
        raise ConfigError("name the folder to write the export to, e.g. --out export/bottle")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; give a folder for {MODEL_FILE} and {MANIFEST_FILE}")
    if (folder / MANIFEST_FILE).exists() or (folder / MODEL_FILE).exists():
        raise ConfigError(f"--out {folder} already holds an export; choose another folder or remove it")
    if is_onnx_spec(options.get("backbone")):
        raise ConfigError(f"--backbone {options['backbone']} is already an export; export from a CLIP backbone")
    if options.get("device", "auto") not in ("auto", "cpu"):
        raise ConfigError(f"--device {options['device']}: exports are traced on the CPU (use auto or cpu)")
    if options.get("precision", "auto") not in ("auto", "fp32"):
        raise ConfigError(f"--precision {options['precision']}: exports are fp32 (use auto or fp32)")
    if facts["needs_references"] and not has_references:
        raise ConfigError(f"{scorer} needs normal reference images, which the export bakes in: give them with --refs")
    if options.get("tile") is not None:
        raise ConfigError("--tile: an export scores whole images (tiles are cut and stitched outside the graph)")
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, "onnx", what="vlad export --format onnx")
    reason = scorer_class(scorer).export_refusal(options)
    if reason:
        raise ConfigError(f"cannot export {scorer}: {reason}")
    return folder


def export_onnx(
    scorer: str,
    object_name: str,
    out: str | Path,
    *,
    references: Sequence[ImageLike] | None = None,
    adapter: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    **options: Any,
) -> dict[str, Any]:
    """Build the scorer ``scorer`` on the CPU (fp32), apply ``adapter``, fit ``references`` and export it for
    ``object_name`` to the folder ``out`` (see :func:`export_scorer`); ``options`` go to the scorer
    (``backbone``, ``profile``, ``image_size``, ``concepts``, ``threshold``, ...). Returns the manifest."""
    from vlad.scorers import get_scorer

    check_export(scorer, object_name, out, options, has_references=bool(references))
    built = get_scorer(scorer, **{**options, "device": "cpu", "precision": "fp32"})
    if adapter is not None:
        from vlad.adapters import apply_adapter

        apply_adapter(built, adapter)
    return export_scorer(built, object_name, out, references=references, opset=opset)


def export_scorer(
    scorer: Scorer,
    object_name: str,
    out: str | Path,
    *,
    references: Sequence[ImageLike] | None = None,
    opset: int = DEFAULT_OPSET,
) -> dict[str, Any]:
    """Export a built scorer (adapter applied) for ``object_name``: ``out/model.onnx`` and ``out/manifest.json``.

    Args:
        scorer: a :class:`~vlad.scorers.base.Scorer` on the CPU; ``references`` are fitted into it when given.
        object_name: the product; the exported graph scores only this one.
        out: the output folder.
        references: normal reference images (few-shot): their memory and calibrated thresholds are baked in.
        opset: the ONNX opset.

    Returns:
        the manifest (also written to ``out/manifest.json``).

    Raises:
        ConfigError: see :func:`check_export`.
        ExportError: tracing failed, or the graph disagrees with torch by more than :data:`CHECK_TOLERANCE`.
    """
    import torch

    object_name = (object_name or "").strip()
    options = {"profile": scorer.profile, "detector": getattr(scorer, "detector_spec", None), "dattn": _dattn(scorer)}
    options["tile"] = getattr(scorer, "tiling", None)
    folder = check_export(scorer.name, object_name, out, options, has_references=bool(references) or scorer.few_shot)
    _check_postprocessing(scorer)
    if str(scorer.backbone.device) != "cpu" or scorer.backbone.dtype != torch.float32:
        raise ConfigError("exports are traced from a CPU fp32 scorer (build it with device='cpu', precision='fp32')")
    if references:
        scorer.fit(references)
    thresholds, notes = _baked_thresholds(scorer, object_name)
    graph = _graph(scorer, object_name)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        check = _export_graph(graph, folder / MODEL_FILE, opset)
    except BaseException:
        for leftover in folder.glob(f"{MODEL_FILE}*"):  # no half export left behind to block the next attempt
            leftover.unlink()
        raise
    manifest = _manifest(scorer, object_name, thresholds, notes, check, opset, folder)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("exported %s for %r to %s", scorer.name, object_name, folder)
    return manifest


def _check_postprocessing(scorer: Scorer) -> None:
    """The runtime redoes the base class's post-processing (bilinear resize, no ``_smooth``): refuse others."""
    from vlad.scorers.base import Scorer

    methods = ("_smooth", "_to_input_resolution", "_results")
    custom = [m for m in methods if getattr(type(scorer), m) is not getattr(Scorer, m)]
    if custom:
        raise ConfigError(f"cannot export {scorer.name}: its post-processing ({', '.join(custom)}) is its own")


def _dattn(scorer: Scorer) -> str | None:
    """The D-Attn DINO spec of a Crane+ scorer, else None."""
    dattn = getattr(scorer, "dattn", None)
    return None if dattn is None else str(dattn.spec)


def _baked_thresholds(scorer: Scorer, object_name: str) -> tuple[dict[str, Any], list[str]]:
    """The scorer's own thresholds for the product (default, or calibrated on its references) before any user
    threshold or sensitivity, and the warnings its results carry."""
    user, sensitivity = scorer.user_threshold, scorer.sensitivity
    scorer.user_threshold, scorer.sensitivity = None, 0.5
    try:
        base = scorer.thresholds(object_name)
        notes = list(scorer.warnings())
    finally:
        scorer.user_threshold, scorer.sensitivity = user, sensitivity
    fields = dataclasses.asdict(base)
    fields.pop("sensitivity")
    return fields, notes


def _graph(scorer: Scorer, object_name: str) -> Any:
    """A torch module: images (B, 3, S, S) -> (scores (B,), maps (B, h, w)) of ``scorer`` for ``object_name``, with
    the reference memory (None in zero-shot mode) held fixed."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = scorer.backbone.model  # registered, so its weights become named initializers
            self.memory = scorer._full_memory()
            self.image_size = scorer.image_size

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            feats = {k: v.float() for k, v in scorer._extract(images).items()}
            scores, maps = scorer._score(feats, object_name, self.memory)
            return scores.float(), maps.float()

    return Graph().eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress prints and warnings stay out of the command's output (logged at debug level)."""
    buffer = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
        warnings.simplefilter("ignore")
        yield
    if buffer.getvalue().strip():
        logger.debug("torch.onnx.export said:\n%s", buffer.getvalue())


def _export_graph(graph: Any, path: Path, opset: int) -> dict[str, Any]:
    """Trace with ``torch.onnx.export`` (dynamo, dynamic batch axis), save, and compare onnxruntime with torch on a
    batch of two and a batch of one (the same random inputs)."""
    import torch

    sample = torch.randn(2, 3, graph.image_size, graph.image_size, generator=torch.Generator().manual_seed(0))
    batches = [sample, sample[:1]]
    with torch.no_grad():  # also fills the backbone's text cache, so the text tower is not traced
        expected = [graph(b) for b in batches]
    t0 = time.perf_counter()
    try:
        with _quiet():
            program = torch.onnx.export(
                graph,
                (sample,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
            program.save(str(path))
    except Exception as exc:  # noqa: BLE001 - whatever the tracer raises becomes one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {first}") from exc
    logger.info("traced and saved %s in %.1f s", path, time.perf_counter() - t0)
    return _check(path, [b.numpy() for b in batches], [(s.numpy(), m.numpy()) for s, m in expected])


def _check(path: Path, batches: list, expected: list) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    score_diff = map_diff = 0.0
    for x, (scores, maps) in zip(batches, expected, strict=True):
        got_scores, got_maps = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        if got_maps.shape != maps.shape:
            raise ExportError(f"the exported graph gives maps of shape {got_maps.shape}, torch {maps.shape}")
        score_diff = max(score_diff, float(np.abs(got_scores - scores).max()))
        map_diff = max(map_diff, float(np.abs(got_maps - maps).max()))
    if not max(score_diff, map_diff) <= CHECK_TOLERANCE:
        raise ExportError(
            f"the exported graph disagrees with torch: max |score diff| {score_diff:.3g}, max |map diff| "
            f"{map_diff:.3g} (tolerance {CHECK_TOLERANCE:g})"
        )
    return {
        "batch_sizes": [len(x) for x in batches],
        "max_abs_score_diff": score_diff,
        "max_abs_map_diff": map_diff,
        "map_shape": list(expected[0][1].shape[1:]),
    }


def _manifest(
    scorer: Scorer,
    object_name: str,
    thresholds: dict[str, Any],
    notes: list[str],
    check: dict[str, Any],
    opset: int,
    folder: Path,
) -> dict[str, Any]:
    import torch

    backbone = scorer.backbone
    settings = scorer.describe()
    model = folder / MODEL_FILE
    data = [p for p in sorted(folder.iterdir()) if p.name.startswith(MODEL_FILE) and p.name != MODEL_FILE]
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "vlad_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "opset": opset,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scorer": scorer.name,
        "object": object_name,
        "backbone": backbone.spec,
        "random_weights": bool(backbone.is_random),
        "profile": scorer.profile,
        "image_size": scorer.image_size,
        "grid": list(scorer.grid),
        "references": scorer.n_references,
        "concepts": settings.get("concepts"),
        "adapter": scorer.adapter,
        "detector": getattr(scorer, "detector_spec", None),
        "dattn": _dattn(scorer),
        "settings": settings,
        "preprocess": _preprocess_spec(scorer),
        "graph": {
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, scorer.image_size, scorer.image_size]},
            "outputs": {"scores": ["batch"], "maps": ["batch", *check["map_shape"]]},
        },
        "postprocess": {
            "resize": "bilinear (align_corners=False) from the graph's map to each input image's size",
            "smooth": None,
            "regions": "thresholds below, then 8-connected regions of the map (vlad.regions)",
        },
        "thresholds": thresholds,
        "user_threshold": scorer.user_threshold,
        "sensitivity": scorer.sensitivity,
        "prompt_phrases": scorer.prompt_phrases(object_name),
        "warnings": notes,
        "check": check,
        "model": {"file": MODEL_FILE, "sha256": file_sha256(model), "bytes": model.stat().st_size},
        "external_data": {p.name: file_sha256(p) for p in data},
    }


def _preprocess_spec(scorer: Scorer) -> dict[str, Any]:
    """What :meth:`vlad.backbones.clip.ClipBackbone.preprocess` does, as the runtime redoes it."""
    backbone = scorer.backbone
    return {
        "resize": "bicubic",
        "size": [scorer.image_size, scorer.image_size],
        "keep_aspect": False,
        "scale": "1/255",
        "mean": [float(v) for v in backbone._mean.flatten()],
        "std": [float(v) for v in backbone._std.flatten()],
        "layout": "NCHW, RGB, float32",
    }
