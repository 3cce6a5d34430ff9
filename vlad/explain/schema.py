"""The structured inspection report a language model is asked for, and the tolerant-but-strict reply parser.

Strict: unknown keys, wrong enum values and out-of-range confidences are rejected (``extra="forbid"``); a reply is
never silently patched into a report. Tolerant only in *finding* the JSON: code fences and prose around one JSON
object are stripped before validation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_NAME = "anomaly_report"
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


class AnomalyReport(BaseModel):
    """One inspection report.

    ``verdict`` restates the verdict being explained (the scorer's, which decides); ``model_says_anomalous`` and
    ``confidence`` are the language model's own yes/no and how sure it is, reported next to the scorer's.
    """

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["normal", "anomalous"]
    defect_type: str = Field(description='short defect name, e.g. "scratch"; "none" when normal')
    location: str = Field(description='where on the part, e.g. "top left"; "none" when normal')
    severity: Literal["none", "minor", "major", "critical"]
    rationale: str = Field(description="one to three sentences grounded in the images and the facts")
    model_says_anomalous: bool = Field(description="your own judgement from the images: is the part defective?")
    confidence: float = Field(ge=0.0, le=1.0, description="how sure you are of model_says_anomalous, 0..1")


def report_json_schema() -> dict[str, Any]:
    """The JSON schema of :class:`AnomalyReport` (``additionalProperties: false``, every key required)."""
    schema = AnomalyReport.model_json_schema()
    schema.pop("description", None)  # the class docstring is for programmers, not for the model
    schema["required"] = list(AnomalyReport.model_fields)
    return schema


def response_format() -> dict[str, Any]:
    """The OpenAI ``response_format`` value requesting an :class:`AnomalyReport` (vLLM honours it)."""
    return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "schema": report_json_schema()}}


@dataclass(frozen=True)
class ParsedReply:
    """The outcome of parsing one reply: a report, or a one-line reason why there is none."""

    report: AnomalyReport | None
    error: str | None


def extract_json(text: str) -> str | None:
    """The JSON object text inside a reply: a fenced block's content, else the span from the first ``{`` to the
    last ``}``; None when there is no brace pair."""
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    return text[start : end + 1]


def parse_report(text: str | None) -> ParsedReply:
    """Validates a model reply as an :class:`AnomalyReport`.

    Args:
        text: the raw reply.

    Returns:
        ``ParsedReply(report, None)`` on success, else ``ParsedReply(None, reason)`` with a one-line reason.
    """
    if not text or not text.strip():
        return ParsedReply(None, "the reply is empty")
    candidate = extract_json(text)
    if candidate is None:
        return ParsedReply(None, f"the reply holds no JSON object: {_snippet(text)}")
    try:
        data = json.loads(candidate)
    except json.JSONDecodeError as exc:
        return ParsedReply(None, f"the reply is not valid JSON ({exc.msg} at character {exc.pos}): {_snippet(text)}")
    if not isinstance(data, dict):
        return ParsedReply(None, f"the reply is JSON but not an object: {_snippet(text)}")
    try:
        return ParsedReply(AnomalyReport.model_validate(data), None)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'report'}: {e['msg']}" for e in exc.errors())
        return ParsedReply(None, f"the JSON does not match the report schema: {problems}")


def _snippet(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "...")
