"""What the web UI does, without Gradio: inspections, conversations, batches. Handlers in :mod:`webui.app` are thin.

The models load once per process and are shared: backbones are cached by :func:`vlad.backbones.load_backbone`,
detectors by :mod:`vlad.grounding`. Everything per user (the current image, its result, references, rules and the
conversation) lives in a :class:`Session`, which the app keeps in a ``gr.State``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from vlad.cli.common import unique_name
from vlad.errors import VladError

logger = logging.getLogger(__name__)

OUTPUT_ROOT = Path(tempfile.gettempdir()) / "vlad-webui"
GUESS_MIN = 0.5
"""A guessed product below this probability is inspected as ``object``."""


@dataclass
class Inspection:
    """One inspected image and everything derived from it."""

    image: Image.Image
    product: str
    result: Any  # AnomalyResult
    base_result: Any  # before rules, for re-thresholding
    overlay: Image.Image
    conversation: Any  # vlad.explain.Conversation
    rules_text: str = ""
    report_path: Path | None = None
    detector: Any = None  # the vlad.Detector that inspected it: re-thresholding goes through the same pipeline
    record: Any = None  # its vlad.pipeline.InspectionRecord
    file: str = "image"  # the user's file name (never the server's upload path)
    product_guess: tuple[str, float] | None = None  # (best name, probability) when vlad guessed the product
    options: dict[str, Any] = field(default_factory=dict)  # scorer, backbone, references: to inspect it again
    sensitivity: float = 0.5


@dataclass
class Session:
    """Per-user state: isolated from every other browser session."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    inspection: Inspection | None = None

    @property
    def folder(self) -> Path:
        path = OUTPUT_ROOT / self.id
        path.mkdir(parents=True, exist_ok=True)
        return path


class InspectorService:
    """Shared, process-wide settings and model access.

    Args:
        scorer: default scorer name.
        backbone: default backbone spec (None: the scorer's default).
        lvlm: explainer backend spec (``template`` needs no model).
        device: ``auto``, ``cpu``, ``cuda``...
        profile: scorer profile, ``paper`` or ``vlad`` (None: the default, ``paper``).
        adapter: a learned or imported adapter (bundled name or folder) applied to every scorer built.
    """

    def __init__(
        self,
        scorer: str = "winclip",
        backbone: str | None = None,
        lvlm: str = "template",
        device: str = "auto",
        max_upload_mb: float = 20.0,
        profile: str | None = None,
        adapter: str | None = None,
        tile: int | str | None = None,
    ) -> None:
        from vlad.scorers import list_scorers
        from vlad.scorers.tiling import Tiling

        if scorer not in list_scorers():
            raise VladError(f"unknown scorer {scorer!r}; available: {', '.join(list_scorers())}")
        from vlad.scorers.base import check_profile

        check_profile(profile)
        Tiling.parse(tile)
        self.tile = tile
        self.scorer = scorer
        self.backbone = backbone
        self.profile = profile
        self.adapter = adapter
        self.lvlm = lvlm
        self.device = device
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self._lock = threading.Lock()
        self.lvlm_problem = self._check_lvlm()

    @property
    def concurrency(self) -> int:
        """Scoring events served at once: 1 on CPU (two would only share the cores), 2 on a GPU."""
        from vlad.backbones import resolve_device

        return 2 if resolve_device(self.device).startswith("cuda") else 1

    # ------------------------------------------------------------------ status
    def _check_lvlm(self) -> str | None:
        if self.lvlm == "template":
            return None
        try:
            from vlad.explain import load_backend

            backend = load_backend(self.lvlm)
            if hasattr(backend, "list_models"):
                backend.list_models()
        except Exception as exc:  # noqa: BLE001 - any failure means "unreachable", said in the status line
            return str(exc).splitlines()[0][:300]
        return None

    def status_markdown(self) -> str:
        backbone = self.backbone or "the scorer's default"
        parts = [
            f"**scorer** `{self.scorer}` · **profile** `{self.profile or 'paper'}` · **backbone** `{backbone}` · "
            f"**explainer** `{self.lvlm}`" + (f" · **adapter** `{self.adapter}`" if self.adapter else "")
        ]
        if (self.backbone or "").startswith("random:"):
            parts.append(
                f"⚠️ **The backbone `{self.backbone}` has random weights: scores and maps are meaningless.** "
                "Start with real weights, e.g. `vlad serve --backbone "
                "openclip:ViT-B-16-plus-240@laion400m_e31`."
            )
        if self.lvlm_problem:
            parts.append(
                f"⚠️ **The language model `{self.lvlm}` is unreachable** ({self.lvlm_problem}); explanations "
                "and answers come from the template explainer."
            )
        return "\n\n".join(parts)

    # ------------------------------------------------------------------ building blocks
    def build_scorer(self, scorer: str | None, backbone: str | None, sensitivity: float) -> Any:
        """A fresh scorer (cheap: the backbone is cached and shared), so references never leak between users."""
        from vlad.scorers import get_scorer

        name = scorer or self.scorer
        kwargs: dict[str, Any] = {
            "backbone": backbone or self.backbone,
            "device": self.device,
            "sensitivity": sensitivity,
            "profile": self.profile,
        }
        if self.tile is not None and name != "musc":  # musc scores images against each other: it cannot tile
            kwargs["tile"] = self.tile
        if name == "filo":
            no_detector = (backbone or self.backbone or "").startswith(("random:", "onnx:"))  # exports run without one
            kwargs["detector"] = "none" if no_detector else "grounding-dino"
        built = get_scorer(name, **kwargs)
        if self.adapter:
            from vlad.adapters import apply_adapter

            apply_adapter(built, self.adapter)
        return built

    def explainer(self) -> Any:
        return "template" if self.lvlm_problem else self.lvlm

    def pipeline(self, scorer: str | None, backbone: str | None, sensitivity: float, rules: str, product: str) -> Any:
        """The inspection pipeline (:class:`vlad.Detector`) for one request: a fresh scorer, the rules, overlays."""
        from vlad.pipeline import Detector

        return Detector(
            self.build_scorer(scorer, backbone, sensitivity),
            object_name=product.strip() or "object",
            rules=rules or None,
            overlays=True,
        )

    # ------------------------------------------------------------------ inspect
    def inspect(
        self,
        session: Session,
        image_path: str | Path,
        *,
        product: str = "",
        scorer: str | None = None,
        backbone: str | None = None,
        references: Sequence[str | Path] = (),
        rules: str = "",
        sensitivity: float = 0.5,
    ) -> Inspection:
        """Score one image (references and rules applied), explain it, and make it the session's current image.

        The image and the references go through vlad's loader (:func:`vlad.data.load_image`), so the UI decodes them
        as the command line does (orientation, transparency, size checks)."""
        from vlad.data import load_image
        from vlad.explain import Conversation

        self.check_upload(image_path)
        image = load_image(image_path)
        options = {"scorer": scorer, "backbone": backbone, "references": [str(r) for r in references]}
        det, record, guess, evidence = self._score(image, product, rules, sensitivity, options)
        conversation = Conversation(evidence, self.explainer())
        outcome = conversation.explain()
        record.result = record.result.replace(explanation=outcome.explanation)
        inspection = Inspection(
            image,
            record.object_name,
            record.result,
            record.base_result,
            record.overlay,
            conversation,
            rules,
            detector=det,
            record=record,
            file=Path(image_path).name,
            product_guess=guess,
            options=options,
            sensitivity=sensitivity,
        )
        inspection.report_path = write_report(session, inspection)
        session.inspection = inspection
        return inspection

    def _score(
        self, image: Image.Image, product: str, rules: str, sensitivity: float, options: dict[str, Any]
    ) -> tuple[Any, Any, tuple[str, float] | None, Any]:
        """The pipeline's record for one image, the product guess (None when given) and the explainer's evidence."""
        from vlad.data import load_image

        refs = [load_image(p) for p in options["references"]]
        with self._lock:  # one model forward at a time on a shared backbone
            det = self.pipeline(options["scorer"], options["backbone"], sensitivity, rules, product)
            guess = None
            name = product.strip()
            if not name:
                guess = guess_product(det.scorer.backbone, image)
                name = guess[0] if guess[1] >= GUESS_MIN else "object"
            if refs:
                det.fit(refs)
            if det.scorer.transductive and not refs:
                raise VladError(f"the {det.scorer.name} scorer needs good reference images (add some beside the chat)")
            (record,) = det.inspect_many([image], name)
            if not record.ok:
                raise VladError(record.error)
            evidence = _evidence(image, record.result, name, det.scorer.backbone)
        return det, record, guess, evidence

    def reinspect(
        self, session: Session, *, product: str, rules: str, sensitivity: float, reason: str
    ) -> Inspection | None:
        """Score the current image again with another product or other rules (typed in the chat); the conversation
        carries on with the new facts (``reason`` tells a language model what changed)."""
        ins = session.inspection
        if ins is None:
            return None
        det, record, guess, evidence = self._score(ins.image, product, rules, sensitivity, ins.options)
        record.result = record.result.replace(explanation=ins.result.explanation)
        ins.detector, ins.record, ins.result, ins.base_result = det, record, record.result, record.base_result
        ins.overlay, ins.product, ins.product_guess = record.overlay, record.object_name, guess
        ins.rules_text, ins.sensitivity = rules, sensitivity
        ins.conversation.update(evidence, reason)
        ins.report_path = write_report(session, ins)
        return ins

    def clear(self, session: Session) -> None:
        """Forget the current image (its upload failed): no verdict, heat map or regions of an earlier image stay."""
        session.inspection = None

    def check_upload(self, path: str | Path) -> None:
        """Uploads larger than the limit are refused with a message (before any decoding)."""
        path = Path(path)
        size = path.stat().st_size if path.is_file() else 0
        if size > self.max_upload_bytes:
            raise VladError(
                f"{path.name} is {size / 2**20:.1f} MB, over the upload limit of "
                f"{self.max_upload_bytes / 2**20:.0f} MB; send a smaller image"
            )

    def rethreshold(self, session: Session, sensitivity: float) -> Inspection | None:
        """Move the current result to another sensitivity without re-scoring (the same pipeline re-applies rules);
        the conversation's facts follow, so answers state the new threshold."""
        ins = session.inspection
        if ins is None:
            return None
        record = ins.detector.rethreshold(ins.record, sensitivity)
        ins.record, ins.result, ins.overlay = record, record.result, record.overlay
        ins.sensitivity = sensitivity
        evidence = _evidence(ins.image, record.result, ins.product, None, previous=ins.conversation.evidence)
        ins.conversation.update(evidence, f"the sensitivity was set to {sensitivity:.2f}")
        ins.report_path = write_report(session, ins)
        return ins

    def ask(self, session: Session, question: str) -> Iterator[str]:
        if session.inspection is None:
            yield "Drop a photo of a part first: I answer questions about the current image."
            return
        yield from session.inspection.conversation.ask(question)

    # ------------------------------------------------------------------ batch
    def batch(
        self,
        session: Session,
        paths: Sequence[str | Path],
        *,
        product: str = "",
        scorer: str | None = None,
        backbone: str | None = None,
        references: Sequence[str | Path] = (),
        rules: str = "",
        sensitivity: float = 0.5,
        progress: Any = None,
    ) -> BatchRun:
        """Score many images: one row each, in the order given, failed ones included (with every column).

        Rows are :meth:`vlad.pipeline.InspectionRecord.to_row` (the schema of ``vlad detect``'s report.jsonl) with
        ``path`` set to the user's file name, plus ``file``, ``sensitivity``, ``references``, ``rules``, ``timestamp``
        and a ``severity`` per region (see :func:`batch_row`). Heat maps are saved next to the CSV and JSON files."""
        from vlad.data import load_image
        from vlad.pipeline import InspectionRecord

        folder = session.folder / "batch"
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*_overlay.png"):
            old.unlink()
        names = [Path(p).name for p in paths]
        failed: dict[int, str] = {}
        ok: list[int] = []
        for i, p in enumerate(paths):
            try:
                self.check_upload(p)
                ok.append(i)
            except VladError as exc:
                failed[i] = public_text(str(exc), paths)
        rows: dict[int, dict[str, Any]] = {}
        with self._lock:
            det = self.pipeline(scorer, backbone, sensitivity, rules, product)
            if references:
                det.fit([load_image(r) for r in references])
            guess = None
            name = product.strip()
            if not name:
                guess = _guess_first(det.scorer.backbone, [paths[i] for i in ok])
                name = guess[0] if guess is not None and guess[1] >= GUESS_MIN else "object"
            settings = det.settings()

            def step(done: int, total: int) -> None:
                if progress is not None:
                    progress(done / max(total, 1), desc=f"scored {done} of {total}")

            used: set[str] = set()
            for record in det.iter_inspect([str(paths[i]) for i in ok], name, progress=step):
                index = ok[record.index]
                overlay = None
                if record.ok and record.overlay is not None:
                    overlay = folder / f"{unique_name(Path(names[index]).stem, used)}_overlay.png"
                    record.overlay.save(overlay)
                if record.error:
                    record.error = public_text(record.error, paths)
                rows[index] = batch_row(record, settings, names[index], overlay=overlay)
            for index, error in failed.items():
                rows[index] = batch_row(InspectionRecord(str(paths[index]), name, error=error), settings, names[index])
        ordered = [rows[i] for i in range(len(paths))]
        csv_path, json_path = write_batch(session, ordered)
        return BatchRun(ordered, csv_path, json_path, name, guess, settings)


@dataclass
class BatchRun:
    """A batch's rows (in the order given), its files and what it ran with."""

    rows: list[dict[str, Any]]
    csv_path: Path
    json_path: Path
    product: str
    product_guess: tuple[str, float] | None
    settings: dict[str, Any]

    def counts(self) -> dict[str, int]:
        """How many rows are anomalous, normal and failed."""
        out = {"anomalous": 0, "normal": 0, "failed": 0}
        for row in self.rows:
            out["failed" if row["error"] else row["verdict"]] += 1
        return out


BATCH_CSV_COLUMNS = (
    "file",
    "product",
    "scorer",
    "backbone",
    "profile",
    "adapter",
    "references",
    "sensitivity",
    "threshold",
    "threshold_source",
    "pixel_threshold",
    "verdict",
    "pred_score",
    "normalized_score",
    "n_regions",
    "region_positions",
    "region_boxes",
    "region_sizes",
    "region_area_percent",
    "region_severities",
    "rule_hits",
    "verdict_changed_by",
    "warnings",
    "error",
    "timestamp",
)
"""The CSV's columns: the JSON row flattened (lists joined with ``"; "``, in region order)."""


def batch_row(record: Any, settings: dict[str, Any], file: str, *, overlay: Path | None = None) -> dict[str, Any]:
    """One batch row: ``record.to_row(settings)`` with ``path`` the user's file name (not the server's upload path),
    ``overlay`` the heat map's file name, plus ``file``, ``sensitivity``, ``references``, ``rules``, ``timestamp``
    (UTC, ISO 8601), and each region's ``severity`` (from the rules: a defect rule's severity, else the verdict
    policy's severity for unnamed findings, ``major`` by default). A failed record has every key, null."""
    row = record.to_row(settings, overlay_path=Path(overlay.name) if overlay else None)
    row["path"] = file
    severities = (record.result.meta.get("region_severities") if record.result is not None else None) or []
    by_box = {tuple(s["bbox"]): s["severity"] for s in severities}
    from vlad.rules import VerdictPolicy

    default = VerdictPolicy().default_severity
    for region in row["regions"] or []:
        region["severity"] = by_box.get(tuple(region["bbox"]), default)
    row.update(
        {
            "file": file,
            "sensitivity": settings.get("sensitivity"),
            "references": settings.get("references"),
            "rules": settings.get("rules"),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    return row


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
    """A batch row flattened to :data:`BATCH_CSV_COLUMNS` (empty cells for nulls)."""
    regions = row.get("regions") or []
    hits = row.get("rule_hits") or []
    flat = {
        **{k: row.get(k) for k in BATCH_CSV_COLUMNS},
        "product": row.get("object"),
        "n_regions": None if row.get("regions") is None else len(regions),
        "region_positions": "; ".join(r["position"] for r in regions),
        "region_boxes": "; ".join(" ".join(str(v) for v in r["bbox"]) for r in regions),
        "region_sizes": "; ".join(f"{r['bbox'][2] - r['bbox'][0]}x{r['bbox'][3] - r['bbox'][1]}" for r in regions),
        "region_area_percent": "; ".join(f"{100 * r['area_fraction']:.2f}" for r in regions),
        "region_severities": "; ".join(r.get("severity") or "" for r in regions),
        "rule_hits": "; ".join(f"{h['rule']}: {h['effect']}" for h in hits),
        "verdict_changed_by": "; ".join(
            dict.fromkeys(h["rule"] for h in hits if h["effect"] in ("verdict raised", "verdict lowered"))
        ),
        "warnings": "; ".join(row.get("warnings") or []),
    }
    return {k: "" if v is None else v for k, v in flat.items()}


# ---------------------------------------------------------------------- helpers
def guess_product(backbone: Any, image: Image.Image) -> tuple[str, float]:
    """The product vlad takes the image for, when the user named none: CLIP zero-shot over the product names it knows
    (``prompts/filo.yaml``). Returns (name, probability); ``("object", 0.0)`` for a backbone without a text tower."""
    import torch

    from vlad.finegrained import object_names
    from vlad.resources import load_prompt_file

    if not (hasattr(backbone, "encode_text") and hasattr(backbone, "forward_visual")):
        return "object", 0.0
    names = object_names(load_prompt_file("filo"))
    text = backbone.encode_text([f"a photo of a {n}." for n in names])
    x = backbone.preprocess([image])
    emb = torch.nn.functional.normalize(backbone.forward_visual(x).global_embedding.float(), dim=-1)
    probs = torch.softmax(emb @ text.T / 0.01, dim=-1)[0]
    best = int(probs.argmax())
    return names[best], float(probs[best])


def guess_note(name: str, guess: tuple[str, float] | None) -> str:
    """What the chat says about a guessed product (empty when the user named it)."""
    if guess is None:
        return ""
    best, p = guess
    if name == best:
        return f"I took this for a {best} ({100 * p:.0f} % sure); type the product if that is wrong."
    return (
        f"I could not tell which product this is (closest: a {best}, {100 * p:.0f} % sure), so I inspected it as an "
        "object; type the product if you know it."
    )


def _guess_first(backbone: Any, paths: Sequence[str | Path]) -> tuple[str, float] | None:
    """The guess for the first readable image of a batch (None when none is readable)."""
    from vlad.data import load_image

    for p in paths:
        try:
            image = load_image(p)
        except VladError:
            continue
        return guess_product(backbone, image)
    return None


def _evidence(image: Image.Image, result: Any, name: str, backbone: Any, *, previous: Any = None) -> Any:
    """The explainer's evidence: each region named with its closest defect phrase (a CLIP backbone), or, without a
    backbone, with the phrase of the overlapping region of ``previous`` evidence (re-thresholding never runs the
    model)."""
    from vlad.explain import build_evidence

    clip = backbone if hasattr(backbone, "forward_visual") and hasattr(backbone, "encode_text") else None
    try:
        evidence = build_evidence(image, result, name, backbone=clip)
    except Exception as exc:  # noqa: BLE001 - defect phrases are a nicety: never fail an inspection for them
        logger.warning("defect phrases failed (%s); regions get none", exc)
        evidence = build_evidence(image, result, name)
    if clip is None and previous is not None:
        _carry_phrases(evidence.facts["regions"], previous.facts["regions"])
    return evidence


def _carry_phrases(regions: list[dict[str, Any]], old: list[dict[str, Any]]) -> None:
    """Give each region without a defect type the type of the old region its box overlaps most."""
    for region in regions:
        if region.get("defect_type"):
            continue
        best, best_area = None, 0
        for o in old:
            if not o.get("defect_type"):
                continue
            a, b = region["bbox"], o["bbox"]
            area = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
            if area > best_area:
                best, best_area = o["defect_type"], area
        if best is not None:
            region["defect_type"] = best


def _upload_roots() -> list[str]:
    roots = [os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio"), str(OUTPUT_ROOT)]
    return [r.rstrip("/") for r in roots]


def public_text(text: str, paths: Sequence[str | Path] = ()) -> str:
    """``text`` with every server path replaced by its file name: the uploads given, and anything under Gradio's
    upload folder or the UI's output folder. Users see their own file names, never a server temp path."""
    for p in sorted((str(p) for p in paths), key=len, reverse=True):
        text = text.replace(p, Path(p).name)
    for root in _upload_roots():
        text = re.sub(re.escape(root) + r"/(?:[^\s'\"]*/)?([^\s/'\"]+)", r"\1", text)
    return text


def report_name(file: str) -> str:
    """The Inspect report's file name: ``<image stem>_report.json`` (safe characters only)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(file).stem).strip("._") or "image"
    return f"{stem}_report.json"


def write_report(session: Session, ins: Inspection) -> Path:
    """The Inspect tab's JSON report, named after the image: file name, product (and whether it was guessed),
    rules, sensitivity and the result."""
    path = session.folder / report_name(ins.file)
    guess = None if ins.product_guess is None else {"name": ins.product_guess[0], "probability": ins.product_guess[1]}
    payload = {
        "file": ins.file,
        "product": ins.product,
        "product_guess": guess,
        "rules": ins.rules_text,
        "sensitivity": ins.sensitivity,
        **ins.result.to_dict(),
    }
    path.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    return path


def write_batch(session: Session, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """``batch.csv`` (flat, :data:`BATCH_CSV_COLUMNS`) and ``batch.json`` (the rows as they are)."""
    folder = session.folder / "batch"
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = folder / "batch.csv", folder / "batch.json"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(BATCH_CSV_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow(csv_row(row))
    json_path.write_text(json.dumps(rows, indent=2, default=str), encoding="utf-8")
    return csv_path, json_path
