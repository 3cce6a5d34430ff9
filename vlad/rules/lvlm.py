"""Parsing rules through a language model, with the RuleSet JSON schema as the response format.

The backend is the explainer's (:func:`vlad.explain.backends.load_backend`: one OpenAI-compatible client for the whole
project), whose model backends offer ``complete(messages, max_tokens=, json_schema=)``. The reply is validated with
the schema; any failure raises :class:`RulesLVLMError` with one line saying why, and
:func:`vlad.rules.load.parse_rules` falls back to the deterministic parser and says so.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from vlad.errors import ConfigError, VladError
from vlad.rules.parse import ParseReport, report_from_ruleset, split_clauses, validate_ruleset_data
from vlad.rules.schema import RULE_KINDS, RuleSet, area_names, laft_aliases

logger = logging.getLogger(__name__)

MAX_TOKENS = 2048


class RulesLVLMError(VladError):
    """The language model gave no valid rule set (unreachable, refused, or a reply the schema rejects)."""


def parse_with_lvlm(text: str, lvlm: Any, *, timeout: float = 60.0) -> ParseReport:
    """Parses ``text`` through a language model.

    Args:
        text: the user's rules.
        lvlm: a backend spec (``openai:URL[#model]``, ``transformers:MODEL``) or an object with ``complete``.
        timeout: seconds to wait for the model.

    Returns:
        a :class:`ParseReport` whose ``source`` is the backend's spec; clauses no rule quotes are not understood.

    Raises:
        RulesLVLMError: the model could not be asked or its reply is not a valid rule set.
    """
    backend = json_backend(lvlm, timeout)
    spec = str(getattr(backend, "spec", lvlm))
    schema = {"name": "rule_set", "schema": RuleSet.model_json_schema()}
    try:
        reply = backend.complete(messages(text), max_tokens=MAX_TOKENS, json_schema=schema)
    except Exception as exc:  # noqa: BLE001 -- any backend failure becomes one line and a fallback
        raise RulesLVLMError(f"{spec} failed: {_one_line(exc)}") from exc
    try:
        ruleset = validate_ruleset_data(json.loads(_strip_fences(reply)))
    except (ValueError, ConfigError) as exc:
        raise RulesLVLMError(f"{spec} sent an invalid rule set: {_one_line(exc)}") from exc
    report = report_from_ruleset(ruleset, source=spec, clauses=split_clauses(text))
    report.notes.append(f"parsed by the language model {spec} and validated with the rule schema")
    return report


def json_backend(lvlm: Any, timeout: float) -> Any:
    """A backend object with ``complete(messages, max_tokens=, json_schema=)`` for a spec or a ready backend."""
    if not isinstance(lvlm, str):
        if callable(getattr(lvlm, "complete", None)):
            return lvlm
        raise ConfigError(f"the LVLM backend {type(lvlm).__name__} has no complete() method")
    from vlad.explain.backends import load_backend

    try:
        backend = load_backend(lvlm, timeout=timeout)
    except VladError as exc:
        raise RulesLVLMError(f"cannot use the LVLM {lvlm!r}: {_one_line(exc)}") from exc
    if not callable(getattr(backend, "complete", None)):
        raise RulesLVLMError(f"the LVLM {lvlm!r} cannot complete text (is_model is false)")
    return backend


def messages(text: str) -> list[dict[str, Any]]:
    """The chat messages asking for a rule set: instructions with the vocabulary, then the user's rules."""
    concepts = ", ".join(sorted(set(laft_aliases().values())))
    system = (
        "You turn a quality inspector's rules for visual anomaly detection into JSON that follows the given schema. "
        f"Rule kinds: {', '.join(RULE_KINDS)}. Make one rule per sentence (two when a sentence ignores two concepts) "
        "and copy the sentence exactly into the rule's 'text'. defect: a kind of defect with a severity (minor, major, "
        "critical; major when not said), and 'min_size' with 'unit' when the sentence names a size from which it "
        "applies ('holes bigger than 2 % of the image are critical'; no concept for 'anything larger than 5 % is "
        "critical'). acceptable: a kind of finding that is fine ('don't flag lint' too), with 'where' when the "
        "sentence says where (positions or a part of the product as 'object'). ignore_concept / focus_concept: only "
        f"for these concepts: {concepts}. min_size: regions smaller than 'value' are ignored; no concept when the "
        "sentence names no kind of defect ('ignore specks under 1 %'). Size units: percent_image, percent_object (of "
        "the part), pixels, mm (the longer side) or mm2. region: mode only or ignore, positions from: "
        f"{', '.join(area_names())}. border: regions within 'width' of the image border are ignored; unit "
        "percent_side (of the shorter side; 'ignore the edges' is 5), pixels or mm. required_object: an object that "
        "must be present at least min_count times. A sentence about which severity fails a part sets 'policy' "
        "(fail_at) with its text; one giving the camera's pixels per millimetre sets 'px_per_mm' with its words in "
        "'px_per_mm_text'. Make no rule of a sentence you cannot map; never invent rules."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def _strip_fences(reply: str) -> str:
    text = reply.strip()
    m = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.DOTALL)
    return m.group(1) if m else text


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:240] or type(exc).__name__
