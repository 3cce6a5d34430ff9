"""What the web UI does, without Gradio: inspections, conversations, batches. Handlers in :mod:`webui.app` are thin.

The models load once per process and are shared: backbones are cached by :func:`vlad.backbones.load_backbone`,
detectors by :mod:`vlad.grounding`. Everything per user (the current image, its result, references, rules and the
conversation) lives in a :class:`Session`, which the app keeps in a ``gr.State``.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlad.errors import VladError

logger = logging.getLogger(__name__)

OUTPUT_ROOT = Path(tempfile.gettempdir()) / "vlad-webui"


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
    ) -> None:
        from vlad.scorers import list_scorers

        if scorer not in list_scorers():
            raise VladError(f"unknown scorer {scorer!r}; available: {', '.join(list_scorers())}")
        from vlad.scorers.base import check_profile

        check_profile(profile)
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
        if name == "filo":
            kwargs["detector"] = "none" if (backbone or self.backbone or "").startswith("random:") else "grounding-dino"
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
        """Score one image (references and rules applied), explain it, and make it the session's current image."""
        from vlad.data import load_image
        from vlad.explain import Conversation, build_evidence

        self.check_upload(image_path)
        image = load_image(image_path)
        refs = [load_image(p) for p in references]
        with self._lock:  # one model forward at a time on a shared backbone
            det = self.pipeline(scorer, backbone, sensitivity, rules, product)
            name = product.strip() or guess_product(det.scorer.backbone, image)
            if refs:
                det.fit(refs)
            if det.scorer.transductive and not refs:
                raise VladError(f"the {det.scorer.name} scorer needs good reference images (add them under Settings)")
            (record,) = det.inspect_many([image], name)
        if not record.ok:
            raise VladError(record.error)
        evidence = build_evidence(image, record.result, name)
        conversation = Conversation(evidence, self.explainer())
        outcome = conversation.explain()
        record.result = record.result.replace(explanation=outcome.explanation)
        inspection = Inspection(
            image,
            name,
            record.result,
            record.base_result,
            record.overlay,
            conversation,
            rules,
            detector=det,
            record=record,
        )
        inspection.report_path = write_report(session, inspection)
        session.inspection = inspection
        return inspection

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
        """Move the current result to another sensitivity without re-scoring (the same pipeline re-applies rules)."""
        ins = session.inspection
        if ins is None:
            return None
        record = ins.detector.rethreshold(ins.record, sensitivity)
        ins.record, ins.result, ins.overlay = record, record.result, record.overlay
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
    ) -> tuple[list[dict[str, Any]], Path, Path]:
        """Score many images; one row each (errors included). Returns rows, a CSV and a JSON file."""
        from vlad.data import load_image

        rows = []
        ok = []
        for p in paths:
            try:
                self.check_upload(p)
                ok.append(str(p))
            except VladError as exc:
                rows.append({"image": Path(p).name, "verdict": "error", "error": str(exc)})
        with self._lock:
            det = self.pipeline(scorer, backbone, sensitivity, rules, product)
            if references:
                det.fit([load_image(r) for r in references])
            name = product.strip() or (guess_product(det.scorer.backbone, load_image(ok[0])) if ok else "object")

            def step(done: int, total: int) -> None:
                if progress is not None:
                    progress(done / max(total, 1), desc=f"scored {done} of {total}")

            for record in det.inspect_many(ok, name, progress=step):
                rows.append(_batch_row(record))
        order = {Path(p).name: i for i, p in enumerate(paths)}
        rows.sort(key=lambda r: order.get(r["image"], 0))
        return rows, *write_batch(session, rows)


def _batch_row(record: Any) -> dict[str, Any]:
    name = Path(record.source).name
    if not record.ok:
        return {"image": name, "verdict": "error", "error": record.error}
    res = record.result
    return {
        "image": name,
        "verdict": res.verdict,
        "pred_score": round(res.pred_score, 4),
        "normalized_score": round(res.normalized_score, 3),
        "regions": len(res.regions),
        "rules_fired": "; ".join(h.rule for h in res.rule_hits),
        "error": "",
    }


# ---------------------------------------------------------------------- helpers
def guess_product(backbone: Any, image: Image.Image) -> str:
    """Name the product when the user did not: CLIP zero-shot over the known product names ("object" if unsure)."""
    import torch

    from vlad.finegrained import object_names
    from vlad.resources import load_prompt_file

    names = object_names(load_prompt_file("filo"))
    text = backbone.encode_text([f"a photo of a {n}." for n in names])
    x = backbone.preprocess([image])
    emb = torch.nn.functional.normalize(backbone.forward_visual(x).global_embedding.float(), dim=-1)
    probs = torch.softmax(emb @ text.T / 0.01, dim=-1)[0]
    best = int(probs.argmax())
    return names[best] if float(probs[best]) >= 0.5 else "object"


def write_report(session: Session, ins: Inspection) -> Path:
    path = session.folder / "report.json"
    payload = {"product": ins.product, "rules": ins.rules_text, **ins.result.to_dict()}
    path.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    return path


def write_batch(session: Session, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    folder = session.folder
    csv_path, json_path = folder / "batch.csv", folder / "batch.json"
    keys = ["image", "verdict", "pred_score", "normalized_score", "regions", "rules_fired", "error"]
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in keys})
    json_path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return csv_path, json_path
