"""One explanation per image: the evidence as chat messages, the report request, validation, one repair turn, the
template fallback.

The language model is asked for an :class:`~vlad.explain.schema.AnomalyReport` as JSON. The schema is always
described in the prompt; ``response_format`` is sent as well where the server takes it (vLLM). A reply that does not
validate gets one repair turn; if that fails too, the reply is counted as unparseable (``unparseable`` True, the
reason in ``error``) and the explanation comes from the template, saying so. A backend failure (server down, timeout,
HTTP error) also falls back to the template and says so. Nothing here raises for a model's misbehaviour.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vlad.explain.errors import LVLMError, LVLMUnavailable
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
    """

    explanation: Explanation
    error: str | None = None
    unparseable: bool = False
    repaired: bool = False
    raw_reply: str | None = None
    assistant_text: str = ""
    backend_down: bool = False
    failure: str | None = None

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
    template = prompts()["template"]
    try:
        parsed, reply, repaired = _request_report(backend, report_messages(evidence), max_tokens)
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
        )
    text = report_text(parsed.report, facts)
    report = parsed.report.model_dump()
    return ExplainOutcome(
        Explanation(text, backend.spec, report), repaired=repaired, raw_reply=reply, assistant_text=text
    )


def _request_report(backend: Any, messages: list[Message], max_tokens: int) -> tuple[ParsedReply, str, bool]:
    """Asks for the report; on an invalid reply, asks once more quoting the problem.

    Returns:
        (the last parse, the last reply text, whether the repair turn was needed).
    """
    schema = {"name": SCHEMA_NAME, "schema": report_json_schema()}
    reply = backend.complete(messages, max_tokens=max_tokens, json_schema=schema)
    parsed = parse_report(reply)
    if parsed.report is not None:
        return parsed, reply, False
    logger.info("LVLM reply did not validate (%s); one repair turn", parsed.error)
    repair = [
        *messages,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": prompts()["repair"].format(error=parsed.error).strip()},
    ]
    reply = backend.complete(repair, max_tokens=max_tokens, json_schema=schema)
    return parse_report(reply), reply, True


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
