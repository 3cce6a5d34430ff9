"""The one inspection pipeline: load -> score -> rules -> thresholds and regions -> overlay -> explanation.

:class:`Detector` is the only place that wires a scorer to rules, overlays and explanations. ``vlad detect``,
``vlad eval``, ``vlad chat``, the web UI's Inspect and Batch tabs and the Python API call it and nothing else (as
anomalib's CLI and Gradio inferencers both call ``inferencer.predict``). It returns one :class:`InspectionRecord` per
input, good or failed; :meth:`InspectionRecord.to_row` is the ``report.jsonl`` row, with the same keys either way.

Example:
    >>> from vlad import Detector
    >>> det = Detector("winclip", backbone="random:tiny", rules="ignore specks")  # doctest: +SKIP
    >>> (record,) = det.inspect_many(["part.png"], "bottle")  # doctest: +SKIP
    >>> record.result.verdict, record.to_row(det.settings())["regions"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from vlad.errors import ConfigError, VladError
from vlad.result import AnomalyResult
from vlad.thresholds import Thresholds

if TYPE_CHECKING:
    from vlad.explain.rows import ExplainOptions, RowExplainer
    from vlad.scorers.base import ImageLike, Scorer

logger = logging.getLogger(__name__)

RESULT_KEYS = (
    "pred_score",
    "normalized_score",
    "pred_label",
    "verdict",
    "threshold",
    "pixel_threshold",
    "threshold_source",
    "regions",
    "image_size",
    "rule_hits",
    "timings",
    "warnings",
)
"""Keys a report row takes from the result; a failed input has them all, as null."""

Progress = Callable[[int, int], None]
"""``progress(done, total)``: called after each scored batch."""


@dataclass
class InspectionRecord:
    """One input and everything the pipeline derived from it.

    Attributes:
        source: the path as given, or a name for in-memory images.
        object_name: the product name it was scored as.
        result: the final result (rules applied, explanation attached), or None when the input failed.
        base_result: the scorer's result before rules (re-thresholding starts from it).
        image: the decoded RGB image (None when it could not be read).
        overlay: the rendered overlay, when the detector renders overlays (see :func:`vlad.viz.render_result`).
        legend: the overlay's legend strip (verdict, score, colour bar, numbered regions, rule hits), with the overlay.
        explanation: the explanation row keys (``explanation``, ``report``, ``lvlm``, ``explain_error``) or None.
        error: one line saying why this input failed, or None.
    """

    source: str
    object_name: str
    result: AnomalyResult | None = None
    base_result: AnomalyResult | None = None
    image: Image.Image | None = None
    overlay: Image.Image | None = None
    legend: Image.Image | None = None
    explanation: dict[str, Any] | None = None
    error: str | None = None
    index: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_row(
        self,
        settings: Mapping[str, Any],
        *,
        overlay_path: Path | None = None,
        map_path: Path | None = None,
        explain: bool = False,
    ) -> dict[str, Any]:
        """The report row: the same keys for good and failed inputs (failed ones hold nulls and ``error``)."""
        d = self.result.to_dict() if self.result is not None else {}
        row: dict[str, Any] = {
            "path": self.source,
            "object": self.object_name,
            **{k: settings.get(k) for k in ("scorer", "backbone", "profile", "adapter")},
        }
        row.update({k: d.get(k) for k in RESULT_KEYS})
        row.update(
            {
                "overlay": str(overlay_path) if overlay_path else None,
                "map": str(map_path) if map_path else None,
                "error": self.error,
            }
        )
        if explain:
            from vlad.explain.rows import ROW_KEYS

            row.update({k: (self.explanation or {}).get(k) for k in ROW_KEYS})
        return row


@dataclass
class _Rules:
    ruleset: Any
    detector: Any
    hits: list = field(default_factory=list)
    object_name: str | None = None


class Detector:
    """A scorer with its references, rules, overlays and explainer: the inspection pipeline.

    Args:
        scorer: registry name (see :func:`vlad.list_scorers`) or a built :class:`~vlad.scorers.base.Scorer`.
        backbone: backbone spec; the scorer's default if None (only with a scorer name).
        references: normal reference images (paths, PIL images or arrays) for few-shot scoring.
        object_name: the product name used when a call does not give one.
        rules: natural-language rules (words, a rules/profile file path, or a :class:`~vlad.rules.RuleSet`).
        detector: a zero-shot object detector (or its spec) for rules about objects and "% of the part".
        adapter: a learned or imported adapter (bundled name or folder) applied to the scorer.
        explain: explain every result: an :class:`~vlad.explain.rows.ExplainOptions` or a backend spec string.
        overlays: render each result's overlay and legend into its record.
        full_res_overlay: draw overlays at the input's size however large; by default an input longer than
            :data:`vlad.viz.OVERLAY_MAX_SIDE` (2048 px) gets an overlay bounded to that, aspect kept.
        on_warning: called once with each run-level warning (e.g. the language model is unreachable).
        **scorer_kwargs: ``threshold``, ``sensitivity``, ``device``, ``image_size``, ``profile``, ... (see the
            scorer).
    """

    def __init__(
        self,
        scorer: str | Scorer = "winclip",
        *,
        backbone: str | None = None,
        references: Sequence[ImageLike] | None = None,
        object_name: str = "object",
        rules: Any = None,
        detector: Any = None,
        adapter: str | Path | None = None,
        explain: ExplainOptions | str | None = None,
        overlays: bool = False,
        full_res_overlay: bool = False,
        on_warning: Callable[[str], None] | None = None,
        **scorer_kwargs: Any,
    ) -> None:
        if isinstance(scorer, str):
            from vlad.scorers import get_scorer

            self.scorer: Scorer = get_scorer(scorer, backbone=backbone, **scorer_kwargs)
        elif backbone is not None or scorer_kwargs:
            raise ConfigError("pass backbone and scorer options to the scorer you built, not to Detector")
        else:
            self.scorer = scorer
        if adapter is not None:
            from vlad.adapters import apply_adapter

            apply_adapter(self.scorer, adapter)
        self.object_name = object_name
        self.overlays = overlays
        self.full_res_overlay = full_res_overlay
        self.references: list[ImageLike] = []
        self._detector = detector
        self._rules: _Rules | None = None
        self.explainer: RowExplainer | None = _explainer(explain, on_warning)
        self.set_rules(rules)
        if references:
            self.fit(references)

    # ------------------------------------------------------------------ configuration
    def settings(self) -> dict[str, Any]:
        """What determines the results (for reports): the scorer's settings plus rules and explainer."""
        return {
            **self.scorer.describe(),
            "rules": None if self._rules is None else [r.text for r in self._rules.ruleset.rules],
            "lvlm": None if self.explainer is None else self.explainer.options.lvlm,
        }

    def fit(self, references: Sequence[ImageLike]) -> Detector:
        """Use these normal references from now on (few-shot, calibrated threshold)."""
        self.references = list(references)
        self.scorer.fit(self.references)
        return self

    def clear_references(self) -> Detector:
        self.references = []
        self.scorer.clear_references()
        return self

    def set_rules(self, rules: Any) -> Detector:
        """Rules from now on (None: none). Concept rules configure the scorer; the others act on each result."""
        if rules is None or (isinstance(rules, str) and not rules.strip()):
            self._rules = None
            return self
        from vlad.rules import RuleSet, load_rules_arg

        ruleset = rules if isinstance(rules, RuleSet) else load_rules_arg(rules)
        detector = self._detector
        if isinstance(detector, str):
            from vlad.grounding import get_detector

            detector = self._detector = get_detector(detector)
        self._rules = _Rules(ruleset, detector)
        self._configure(self.object_name)
        return self

    def _configure(self, object_name: str) -> list:
        rules = self._rules
        if rules is None:
            return []
        if rules.object_name != object_name:
            from vlad.rules import configure_scorer

            refs = self.references or None
            rules.hits = configure_scorer(self.scorer, rules.ruleset, references=refs, object_name=object_name)
            rules.object_name = object_name
        return rules.hits

    # ------------------------------------------------------------------ inspection
    def inspect_many(
        self,
        items: Sequence[ImageLike],
        object_name: str | None = None,
        *,
        progress: Progress | None = None,
    ) -> list[InspectionRecord]:
        """Inspect images of one product; one record per item, in order. Items that cannot be read get a failed
        record; a transductive scorer (MuSc) sees all readable items as one batch."""
        return sorted(self.iter_inspect(items, object_name, progress=progress), key=lambda r: r.index)

    def iter_inspect(
        self,
        items: Sequence[ImageLike],
        object_name: str | None = None,
        *,
        progress: Progress | None = None,
    ) -> Iterator[InspectionRecord]:
        """:meth:`inspect_many` as a generator, in bounded memory: inputs are decoded one batch ahead on a
        background thread (decoding overlaps the model), scored a batch at a time, and each record is yielded as
        soon as it is finished, so a caller that writes and drops records holds at most two batches of images.
        A failed input's record comes out when its turn to be decoded comes. ``progress(done, total)`` counts
        inputs (failed ones included). A transductive scorer (MuSc) needs every image at once: one batch."""
        name = (object_name or self.object_name).strip() or "object"
        self._configure(name)
        items = list(items)
        step = max(len(items), 1) if self.scorer.transductive else self.scorer.batch_size
        done = 0
        batch: list[tuple[int, str, Image.Image]] = []
        for index, source, image, error in _prefetch(items, ahead=step):
            if error is not None:
                done += 1
                yield InspectionRecord(source, name, error=error, index=index)
            else:
                batch.append((index, source, image))
            if batch and (len(batch) == step or index == len(items) - 1):
                yield from self._score_batch(batch, name)
                done += len(batch)
                batch = []
            if progress is not None and (error is not None or not batch):
                progress(done, len(items))

    def _score_batch(self, batch: list[tuple[int, str, Image.Image]], name: str) -> Iterator[InspectionRecord]:
        results = self.scorer.score_many([im for _, _, im in batch], name)
        for (index, source, image), base in zip(batch, results, strict=True):
            record = InspectionRecord(source, name, base_result=base, image=image, index=index)
            yield self._finish(record, base)

    def _finish(self, record: InspectionRecord, base: AnomalyResult) -> InspectionRecord:
        """Rules, overlay and explanation on a scored (or re-thresholded) result."""
        result = self._apply_rules(base, record.image, record.object_name)
        if self.explainer is not None:
            record.explanation = self.explainer.explain(
                record.image, result, record.object_name, backbone=self.scorer.backbone
            )
            result = result.replace(explanation=_explanation(record.explanation))
        record.result = result
        self._draw(record)
        return record

    def _draw(self, record: InspectionRecord) -> None:
        """The overlay and its legend into the record, when the detector renders overlays."""
        if not self.overlays or record.result is None:
            return
        from vlad.viz import render_legend, render_result

        record.overlay = render_result(record.image, record.result, full_res=self.full_res_overlay)
        record.legend = render_legend(record.result, overlay_size=record.overlay.size)

    def _apply_rules(self, result: AnomalyResult, image: Image.Image | None, object_name: str) -> AnomalyResult:
        rules = self._rules
        if rules is None:
            return result
        from vlad.rules import apply_rules

        return apply_rules(
            result,
            rules.ruleset,
            image=image,
            backbone=self.scorer.backbone,
            detector=rules.detector,
            object_name=object_name,
            scorer_hits=rules.hits,
        )

    def rethreshold(self, record: InspectionRecord, sensitivity: float) -> InspectionRecord:
        """The record at another sensitivity without re-scoring: thresholds moved, rules and overlay redone; the
        explanation is kept (it describes the image, and the conversation carries on)."""
        if record.base_result is None:
            raise ConfigError(f"{record.source} has no result to re-threshold ({record.error})")
        moved = rethreshold(record.base_result, sensitivity)
        out = InspectionRecord(
            record.source, record.object_name, base_result=moved, image=record.image, index=record.index
        )
        result = self._apply_rules(moved, record.image, record.object_name)
        if record.result is not None and record.result.explanation is not None:
            result = result.replace(explanation=record.result.explanation)
        out.explanation, out.result = record.explanation, result
        self._draw(out)
        return out

    # ------------------------------------------------------------------ the short API
    def detect(self, image: ImageLike, object_name: str | None = None, *, rules: Any = None) -> AnomalyResult:
        """Inspect one image; ``rules`` (words, a file, or a RuleSet) replace the detector's own from now on."""
        return self.detect_many([image], object_name, rules=rules)[0]

    def detect_many(
        self, images: Sequence[ImageLike], object_name: str | None = None, *, rules: Any = None
    ) -> list[AnomalyResult]:
        """Inspect images of one product; unreadable images raise :class:`~vlad.errors.ImageLoadError`."""
        if rules is not None:
            self.set_rules(rules)
        records = self.inspect_many(images, object_name)
        failed = [r for r in records if not r.ok]
        if failed:
            from vlad.errors import ImageLoadError

            raise ImageLoadError(failed[0].error or failed[0].source)
        return [r.result for r in records]  # type: ignore[misc]

    @staticmethod
    def overlay(result: AnomalyResult, image: ImageLike, *, full_res: bool = False) -> Image.Image:
        """The heat map over the image with the predicted regions outlined in red and numbered as in the report
        (bounded to 2048 px on the long side unless ``full_res``); :func:`vlad.viz.render_legend` draws its legend."""
        from vlad.viz import render_result

        return render_result(_load(image), result, full_res=full_res)


def rethreshold(result: AnomalyResult, sensitivity: float) -> AnomalyResult:
    """The same result at another sensitivity, without re-scoring: thresholds shift by ``(old - new) * scale`` (see
    :mod:`vlad.thresholds`), and the mask, regions, label and normalised score follow. Rule effects are not
    re-applied (:meth:`Detector.rethreshold` re-applies them)."""
    return Thresholds.of(result).with_sensitivity(sensitivity).apply(result)


def _explainer(explain: Any, on_warning: Callable[[str], None] | None) -> RowExplainer | None:
    if explain is None:
        return None
    from vlad.explain.rows import ExplainOptions, RowExplainer

    options = explain if isinstance(explain, ExplainOptions) else ExplainOptions(lvlm=str(explain))
    return RowExplainer(options, on_down=on_warning)


def _explanation(row: Mapping[str, Any]) -> Any:
    from vlad.result import Explanation

    return Explanation(text=row["explanation"], backend=row["lvlm"], report=row["report"])


def _prefetch(items: Sequence[Any], ahead: int) -> Iterator[tuple[int, str, Image.Image | None, str | None]]:
    """``(index, source, image, error)`` for each item in order, decoded by one background thread that runs at most
    ``ahead`` items in front of the consumer (PIL decodes outside the GIL, so decoding overlaps scoring). Unexpected
    errors are raised in the consumer; the thread stops when the consumer stops iterating."""
    slots: queue.Queue = queue.Queue(maxsize=max(ahead, 1))
    stop = threading.Event()

    def decode() -> None:
        for index, item in enumerate(items):
            source = _source(item, index)
            try:
                entry: tuple = (index, source, _load(item), None)
            except VladError as exc:
                entry = (index, source, None, str(exc))
            except BaseException as exc:  # handed to the consumer, which raises it
                entry = (index, source, None, exc)
            while not stop.is_set():
                try:
                    slots.put(entry, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set() or isinstance(entry[3], BaseException):
                return

    worker = threading.Thread(target=decode, name="vlad-decode", daemon=True)
    worker.start()
    try:
        for _ in range(len(items)):
            index, source, image, error = slots.get()
            if isinstance(error, BaseException):
                raise error
            yield index, source, image, error
    finally:
        stop.set()


def _source(item: Any, index: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"<image {index}>"


def _load(item: Any) -> Image.Image:
    """A path (with vlad's checks), a PIL image or an (H, W[, 3|4]) uint8 array -> RGB."""
    if isinstance(item, (str, Path)):
        from vlad.data import load_image

        return load_image(item)
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        from vlad.scorers.base import as_pil

        return as_pil(item)
    raise ConfigError(f"cannot inspect a {type(item).__name__}; give a path, a PIL image or a uint8 array")
