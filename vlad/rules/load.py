"""Rules from what the user gives: words (through the deterministic parser, or a language model first), a rules or
product-profile file, or a ready :class:`~vlad.rules.schema.RuleSet`.

The library side of ``--rules``: :mod:`vlad.api`, the CLI (:mod:`vlad.cli.rules` re-exports these) and the web UI
all load rules here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlad.errors import ConfigError
from vlad.rules.parse import EMPTY_RULES_MESSAGE, ParseReport, parse_deterministic, report_from_ruleset, split_clauses
from vlad.rules.schema import RULE_FILE_SUFFIXES, RuleSet, load_rules, read_rules_text

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")

__all__ = ["TEXT_SUFFIXES", "load_rules_arg", "parse_rules", "read_rules_arg"]


def parse_rules(text: str, *, lvlm: Any = None, timeout: float = 60.0) -> ParseReport:
    """Reads natural-language rules.

    Args:
        text: the rules, one per line, ``;`` or sentence.
        lvlm: None or ``"template"`` for the deterministic parser; a backend spec string (``openai:URL[#model]``,
            ``transformers:MODEL``) or a backend object with ``complete(messages, max_tokens=, json_schema=)`` to parse
            through a language model first. The text is sent with the RuleSet JSON schema as the response format; a
            reply that fails validation falls back to the deterministic parser, and the report says so.
        timeout: seconds to wait for the language model.

    Returns:
        a :class:`~vlad.rules.parse.ParseReport`; check its ``ok``.

    Raises:
        ConfigError: ``text`` is empty.
    """
    if not isinstance(text, str) or not split_clauses(text):
        raise ConfigError(EMPTY_RULES_MESSAGE)
    if lvlm is None or lvlm == "template":
        return parse_deterministic(text)
    from vlad.rules.lvlm import RulesLVLMError, parse_with_lvlm

    try:
        return parse_with_lvlm(text, lvlm, timeout=timeout)
    except RulesLVLMError as exc:
        logger.warning("rule parsing through the language model failed: %s", exc)
        fallback = parse_deterministic(text)
        fallback.notes.insert(
            0, f"the language model gave no valid rule set ({exc}); the deterministic parser was used"
        )
        return fallback


def read_rules_arg(value: str | Sequence[str], *, lvlm: Any = None, timeout: float = 60.0) -> ParseReport:
    """The parse report of a ``--rules`` value or ``vlad rules check`` arguments.

    Args:
        value: free text, or a path to a ``.yaml`` / ``.yml`` / ``.json`` rules or profile file, or to a ``.txt`` /
            ``.md`` file of plain-language rules; a list of strings is one rule per item (or one file).
        lvlm: a language-model spec for parsing words (see :func:`parse_rules`).
        timeout: seconds to wait for the language model.

    Raises:
        ConfigError: empty rules, a missing, unreadable or invalid file.
    """
    items = [value] if isinstance(value, str) else list(value)
    if len(items) == 1 and _is_file_arg(items[0]):
        path = Path(items[0]).expanduser()
        suffix = path.suffix.lower()
        if suffix in RULE_FILE_SUFFIXES:
            return report_from_ruleset(load_rules(path), source=str(path))
        return parse_rules(read_rules_text(path), lvlm=lvlm, timeout=timeout)
    return parse_rules("\n".join(items), lvlm=lvlm, timeout=timeout)


def _is_file_arg(value: str) -> bool:
    text = value.strip()
    return "\n" not in text and Path(text).suffix.lower() in (*RULE_FILE_SUFFIXES, *TEXT_SUFFIXES)


def load_rules_arg(value: str | RuleSet | None, *, lvlm: Any = None, timeout: float = 60.0) -> RuleSet:
    """The :class:`RuleSet` of a ``--rules`` value (text or file); an empty RuleSet for None.

    Raises:
        ConfigError: empty rules, a bad file, or rules not understood or contradictory (one line naming the first
            problem, how many there are, and ``vlad rules check`` to see them all).
    """
    if value is None:
        return RuleSet()
    if isinstance(value, RuleSet):
        return value
    report = read_rules_arg(value, lvlm=lvlm, timeout=timeout)
    problems = [*report.not_understood, *report.contradictions]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"--rules: {problems[0]}{more}; run `vlad rules check` to see how vlad reads the rules")
    return report.rules
