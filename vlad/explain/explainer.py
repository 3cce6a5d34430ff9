"""One explanation per image: the evidence as chat messages, the report request, validation, one repair turn, the
template fallback.

The language model is asked for an :class:`~vlad.explain.schema.AnomalyReport` as JSON. The schema is always
described in the prompt; ``response_format`` is sent as well where the server takes it (vLLM). A reply that does not
validate gets one repair turn; if that fails too, the reply is counted as unparseable (``unparseable`` True, the
reason in ``error``) and the explanation comes from the template, saying so. A backend failure (server down, timeout,
HTTP error) also falls back to the template and says so. A reply cut at the token limit (after the backend's one
retry with more tokens, where the server allows it) gets the repair turn with that reason; cut again, it is counted
unparseable and marked ``truncated``, its reason "truncated: the answer hit the N-token limit" rather than a JSON
error. When the server takes fewer pictures per request than the evidence has (vLLM's ``--limit-mm-per-prompt``), the
request is sent again once with the pictures that matter most (:func:`fewer_pictures`), and ``warning`` says so.
Nothing here raises for a model's misbehaviour.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from vlad.explain.errors import LVLMError, LVLMTruncated, LVLMUnavailable, TooManyImages
from vlad.explain.evidence import Evidence
from vlad.explain.schema import SCHEMA_NAME, AnomalyReport, ParsedReply, parse_report, report_json_schema
from vlad.explain.template import explain_text, prompts, template_report
from vlad.result import Explanation

logger = logging.getLogger(__name__)

Message = dict[str, Any]
DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class ExplainOutcome:
    """What one explanation attempt gave.

    Attributes:
        explanation: the words (and the validated report, if any) to attach to the result.
        error: None, or one line saying what went wrong and that the template was used instead.
        unparseable: True when the model answered but no valid report could be read, even after the repair turn.
        repaired: True when the repair turn was needed.
        raw_reply: the model's last reply text (None for the template or when the model could not be reached).
        assistant_text: what the conversation records as the first answer.
        backend_down: True when the backend could not be reached or loaded (callers may stop trying it).
        failure: the bare one-line reason of a backend failure or an unparseable reply (``error`` adds what was done).
        truncated: True when the last reply stopped at the token limit (it is then unparseable, and ``failure`` says
            ``truncated: the answer hit the N-token limit ...`` instead of a JSON error).
        warning: None, or one line about something that went right only in part (fewer pictures were sent).
    """

    explanation: Explanation
    error: str | None = None
    unparseable: bool = False
    repaired: bool = False
    raw_reply: str | None = None
    assistant_text: str = ""
    backend_down: bool = False
    failure: str | None = None
    truncated: bool = False
    warning: str | None = None

    @property
    def report(self) -> dict[str, Any] | None:
        return self.explanation.report


# ---------------------------------------------------------------------- messages
def system_message() -> Message:
    return {"role": "system", "content": prompts()["system"].strip()}


def facts_text(facts: dict[str, Any]) -> str:
    """The facts as prompt lines (templates in ``prompts/explain.yaml`` under ``facts``)."""
    f = prompts()["facts"]
    lines = [
        f["header"].format(object=facts["object"], scorer=facts["scorer"] or "?", backbone=facts["backbone"] or "?"),
        f["verdict"].format(
            **{k: facts[k] for k in ("verdict", "pred_score", "threshold", "threshold_source", "normalized_score")}
        ),
    ]
    for r in facts["regions"]:
        x0, y0, x1, y1 = r["bbox"]
        line = f["region"].format(
            index=r["index"],
            position=r["position"],
            x0=x0,
            y0=y0,
            x1=x1,
            y1=y1,
            percent=100 * r["area_fraction"],
            peak=r["peak_score"],
        )
        lines.append(line + (f["defect_type"].format(defect_type=r["defect_type"]) if r.get("defect_type") else ""))
    if not facts["regions"]:
        lines.append(f["no_regions"].format(position=facts["peak"]["position"]))
    lines += [f["rule"].format(rule=h["rule"], effect=h["effect"]) for h in facts["rule_hits"]] or [f["no_rules"]]
    lines += [f["warning"].format(warning=w) for w in facts["warnings"]]
    if facts.get("process_note"):
        lines.append(f["process_note"].format(object=facts["object"], note=facts["process_note"]))
    return "\n".join(lines)


def evidence_parts(evidence: Evidence) -> list[dict[str, Any]]:
    """OpenAI content parts: a caption and an ``image_url`` (PNG data URL) per picture, then the facts."""
    captions = prompts()["pictures"]
    parts: list[dict[str, Any]] = []
    for n, picture in enumerate(evidence.images, start=1):
        fields: dict[str, Any] = {"n": n, "object": evidence.object_name, "position": picture.position}
        if picture.box is not None:
            fields.update(zip(("x0", "y0", "x1", "y1"), picture.box, strict=True))
        parts.append({"type": "text", "text": captions[picture.kind].format(**fields)})
        parts.append({"type": "image_url", "image_url": {"url": picture.data_url(evidence.max_side)}})
    parts.append({"type": "text", "text": facts_text(evidence.facts)})
    return parts


def report_messages(evidence: Evidence) -> list[Message]:
    """System message plus one user turn: the pictures, the facts and the report request with the schema."""
    p = prompts()
    request = p["report_request"].format(
        object=evidence.object_name, schema=p["schema"].format(object=evidence.object_name)
    )
    content = [*evidence_parts(evidence), {"type": "text", "text": request.strip()}]
    return [system_message(), {"role": "user", "content": content}]


# ---------------------------------------------------------------------- explaining
MODEL_OPINION_FIELDS = ("model_says_anomalous", "confidence")
"""Report fields only a language model fills (its own yes/no and how sure it is); null from the template."""


def explain(evidence: Evidence, backend: Any, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> ExplainOutcome:
    """Explains one image with a backend, falling back to the template (and saying so) when the model fails.

    Args:
        evidence: from :func:`vlad.explain.evidence.build_evidence`.
        backend: from :func:`vlad.explain.backends.load_backend`.
        max_tokens: most tokens the model may generate per reply.

    Returns:
        The :class:`ExplainOutcome`.
    """
    facts = evidence.facts
    if not getattr(backend, "is_model", False):
        text = explain_text(facts)
        # the template restates the detector: it has no opinion, so the model's-opinion fields stay empty
        report = {**template_report(facts).model_dump(), **dict.fromkeys(MODEL_OPINION_FIELDS)}
        return ExplainOutcome(Explanation(text=text, backend="template", report=report), assistant_text=text)
    return _model_explain(evidence, backend, max_tokens)


def _model_explain(evidence: Evidence, backend: Any, max_tokens: int) -> ExplainOutcome:
    """:func:`explain` with a model backend: the report request (at most the pictures the server takes), validation
    and the fallbacks."""
    template, facts = prompts()["template"], evidence.facts
    shown = fewer_pictures(evidence, getattr(backend, "image_limit", None))
    try:
        try:
            parsed, reply, repaired, cut = _request_report(backend, report_messages(shown), max_tokens)
        except TooManyImages as exc:
            if not 0 < exc.limit < len(shown.images):
                raise
            logger.info("%s takes %d picture(s) per request; asking again with fewer", backend.spec, exc.limit)
            shown = fewer_pictures(evidence, exc.limit)
            parsed, reply, repaired, cut = _request_report(backend, report_messages(shown), max_tokens)
    except LVLMError as exc:
        logger.info("LVLM %s failed: %s", backend.spec, exc)
        note = template["fallback"].format(spec=backend.spec, error=exc).strip()
        text = explain_text(facts)
        return ExplainOutcome(
            Explanation(f"{note} {text}", "template"),
            error=f"{exc}; the template explanation was used instead",
            assistant_text=text,
            backend_down=isinstance(exc, LVLMUnavailable),
            failure=str(exc),
        )
    warning = pictures_note(evidence, shown)
    if parsed.report is None:
        note = template["unparseable"].format(spec=backend.spec, error=parsed.error).strip()
        text = explain_text(facts)
        return ExplainOutcome(
            Explanation(f"{note} {text}", "template"),
            error=f"the LVLM reply was unparseable after one repair turn ({parsed.error}); the template was used",
            unparseable=True,
            repaired=True,
            raw_reply=reply,
            assistant_text=text,
            failure=parsed.error,
            truncated=cut,
            warning=warning,
        )
    text = report_text(parsed.report, facts)
    report = parsed.report.model_dump()
    return ExplainOutcome(
        Explanation(text, backend.spec, report),
        repaired=repaired,
        raw_reply=reply,
        assistant_text=text,
        warning=warning,
    )


def _request_report(backend: Any, messages: list[Message], max_tokens: int) -> tuple[ParsedReply, str, bool, bool]:
    """Asks for the report; on an invalid or truncated reply, asks once more quoting the problem.

    Returns:
        (the last parse, the last reply text, whether the repair turn was needed, whether the last reply was cut at
        the token limit).
    """
    schema = {"name": SCHEMA_NAME, "schema": report_json_schema()}
    reply, cut = _complete(backend, messages, max_tokens, schema)
    parsed = parse_report(reply)
    if parsed.report is not None:
        return parsed, reply, False, False
    problem = cut or parsed.error
    logger.info("LVLM reply did not validate (%s); one repair turn", problem)
    repair = [
        *messages,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": prompts()["repair"].format(error=problem).strip()},
    ]
    reply, cut = _complete(backend, repair, max_tokens, schema)
    parsed = parse_report(reply)
    if parsed.report is None and cut:
        return ParsedReply(None, cut), reply, True, True
    return parsed, reply, True, False


def _complete(backend: Any, messages: list[Message], max_tokens: int, schema: dict) -> tuple[str, str | None]:
    """(the reply text, None) or, for a reply cut at the token limit, (its partial text, the one-line reason)."""
    try:
        return backend.complete(messages, max_tokens=max_tokens, json_schema=schema), None
    except LVLMTruncated as exc:
        return exc.partial, str(exc)


PICTURE_PRIORITY = ("overlay", "image", "crop", "reference")
"""Which pictures stay when a server takes fewer: the heat-map overlay (it carries the detector's finding), the photo,
the crops (strongest region first, as they are ordered), then the normal reference."""


def fewer_pictures(evidence: Evidence, limit: int | None) -> Evidence:
    """The evidence with at most ``limit`` pictures, chosen by :data:`PICTURE_PRIORITY` and shown in their original
    order; the evidence itself when it has no more than that (or ``limit`` is None)."""
    if limit is None or len(evidence.images) <= limit:
        return evidence
    rank = {kind: i for i, kind in enumerate(PICTURE_PRIORITY)}
    order = sorted(range(len(evidence.images)), key=lambda i: (rank.get(evidence.images[i].kind, len(rank)), i))
    keep = sorted(order[: max(limit, 0)])
    return dataclasses.replace(evidence, images=[evidence.images[i] for i in keep])


def pictures_note(evidence: Evidence, shown: Evidence) -> str | None:
    """The ``[note: ...]`` saying that fewer pictures were sent than the evidence has, or None."""
    if len(shown.images) >= len(evidence.images):
        return None
    kept = ", ".join("photo" if p.kind == "image" else p.kind for p in shown.images) or "none"
    return (
        prompts()["template"]["fewer_pictures"]
        .format(limit=len(shown.images), kept=f"{len(shown.images)} ({kept})", total=len(evidence.images))
        .strip()
    )


def report_text(report: AnomalyReport, facts: dict[str, Any]) -> str:
    """The explanation sentence(s) for a validated report; the detector's verdict leads, the model's differing
    opinion (if any) is stated after it."""
    p = prompts()
    numbers = {k: facts[k] for k in ("object", "pred_score", "threshold")}
    verdict = p["report_verdict"][facts["verdict"]].format(**numbers)
    defect = ""
    if report.defect_type.strip().lower() not in ("", "none"):
        defect = p["report_defect"].format(
            defect_type=report.defect_type, location=report.location, severity=report.severity
        )
    text = p["report_text"].format(verdict_sentence=verdict, defect_sentence=defect, rationale=report.rationale.strip())
    if report.model_says_anomalous != (facts["verdict"] == "anomalous"):
        model_verdict = "anomalous" if report.model_says_anomalous else "normal"
        text += (
            " "
            + p["report_disagrees"]
            .format(object=facts["object"], model_verdict=model_verdict, confidence=report.confidence)
            .strip()
        )
    return " ".join(text.split())
