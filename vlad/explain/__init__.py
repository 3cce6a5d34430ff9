"""The explainer: a language model (or the template) reads the detector's result and explains it in words, and a
conversation about the same image can follow.

The scorer decides; the language model explains, and gives its own verdict next to the scorer's when asked
(``model_says_anomalous`` in the report), never replacing it. ``import vlad.explain`` is light: the submodules, and
pydantic / openai / transformers with them, load on first use of a name below.

Example:
    >>> from vlad.explain import build_evidence, Conversation          # doctest: +SKIP
    >>> conv = Conversation(build_evidence(image, result, "bottle"), "openai:http://127.0.0.1:8000/v1")
    >>> print(conv.explain().explanation.text)
    >>> for piece in conv.ask("where is the defect?"):
    ...     print(piece, end="")
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AnomalyReport": "vlad.explain.schema",
    "parse_report": "vlad.explain.schema",
    "report_json_schema": "vlad.explain.schema",
    "Evidence": "vlad.explain.evidence",
    "build_evidence": "vlad.explain.evidence",
    "build_facts": "vlad.explain.evidence",
    "roi_boxes": "vlad.explain.evidence",
    "load_backend": "vlad.explain.backends",
    "parse_backend_spec": "vlad.explain.backends",
    "OpenAIBackend": "vlad.explain.backends",
    "TransformersBackend": "vlad.explain.backends",
    "TemplateBackend": "vlad.explain.template",
    "explain": "vlad.explain.explainer",
    "ExplainOutcome": "vlad.explain.explainer",
    "explain_result": "vlad.explain",
    "Conversation": "vlad.explain.conversation",
    "VerdictTracker": "vlad.explain.verdicts",
    "LVLMError": "vlad.explain.errors",
}

__all__ = sorted(_EXPORTS)


def explain_result(
    image: Any, result: Any, object_name: str, lvlm: Any = "template", *, max_tokens: int = 512, **evidence_options: Any
) -> Any:
    """A copy of ``result`` with its ``explanation`` filled in (template fallback on model failure, said in the text).

    Args:
        image: the PIL photo the result is about.
        result: an :class:`~vlad.result.AnomalyResult`.
        object_name: the product name.
        lvlm: a backend spec string or backend object (default ``template``).
        max_tokens: most tokens the model may generate.
        **evidence_options: passed to :func:`vlad.explain.evidence.build_evidence` (``process_note``, ``references``,
            ``backbone``, ``max_side``, ...).
    """
    from vlad.explain.backends import load_backend
    from vlad.explain.evidence import build_evidence
    from vlad.explain.explainer import explain

    backend = load_backend(lvlm) if isinstance(lvlm, str) else lvlm
    outcome = explain(build_evidence(image, result, object_name, **evidence_options), backend, max_tokens=max_tokens)
    return result.replace(explanation=outcome.explanation)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None or module == __name__:
        raise AttributeError(f"module 'vlad.explain' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
