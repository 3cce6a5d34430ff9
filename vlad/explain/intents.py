"""What a chat message says besides its question: the product ("the product is a tile", "it's a bottle cap") and rules
("ignore scratches from now on").

Plain Python over regular expressions and the deterministic rule parser (:func:`vlad.rules.parse_rules`); no model.
A message is split into sentences; questions are left for the explainer, a product statement names the product, a
sentence with a rule word that the rule parser reads completely is a rule, and everything else stays the question.
The word lists are in ``prompts/explain.yaml`` under ``understanding``.

Example:
    >>> u = understand("The product is a tile. Ignore scratches from now on. Where is the crack?")  # doctest: +SKIP
    >>> u.product, u.rules, u.question  # doctest: +SKIP
    ('tile', ['ignore scratches'], 'Where is the crack?')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from vlad.explain.template import prompts, stem

__all__ = ["Understood", "product_statement", "rule_statement", "split_sentences", "understand"]

_SENTENCE = re.compile(r"[^.!?;\n]+[.!?;]*")
_NAME = r"(?P<name>[a-z0-9][a-z0-9 '-]*?)"
_PRODUCT_PATTERNS = (
    # explicit: a product unless the words are a defect or a judgement ("the product is fine")
    re.compile(rf"^(?:the |this |our )?product(?: here)? (?:is|are|=) (?:a |an |the )?{_NAME}$"),
    re.compile(rf"^(?:product|object)\s*[:=]\s*(?:a |an |the )?{_NAME}$"),
    re.compile(rf"^(?:i am|i'm|we are|we're) (?:inspecting|checking|looking at) (?:a |an |the |some )?{_NAME}$"),
    # "it's a bottle cap": needs an article ("it's broken") or a known product name ("these are screws") as well
    re.compile(
        rf"^(?:it|this|that|these|those|they|the part|this part|the object)(?: is|'s| are|'re) (?P<art>a |an )?{_NAME}$"
    ),
)
_EXPLICIT = 3  # the first three patterns need no article


@dataclass
class Understood:
    """What a message says.

    Attributes:
        product: the product it names (lower case), or None.
        rules: the rule sentences, cleaned of chat words ("from now on", "please"), for the rules text.
        understood: the rule parser's ``I understood: ...`` lines for those rules.
        question: what is left to answer (the other sentences, joined); empty when nothing is.
    """

    product: str | None = None
    rules: list[str] = field(default_factory=list)
    understood: list[str] = field(default_factory=list)
    question: str = ""


def _words() -> dict[str, Any]:
    return prompts()["understanding"]


def split_sentences(text: str) -> list[str]:
    """The message's sentences, each with its closing punctuation (``?`` marks a question)."""
    return [s.strip() for s in _SENTENCE.findall(text or "") if s.strip(" .!;\t")]


def _plain(sentence: str) -> str:
    """Lower case, closing punctuation and surrounding quotes off, spaces collapsed."""
    text = sentence.strip().lower().replace("\u2019", "'")
    text = re.sub(r"\s+", " ", text).strip(" \t.!;,\"'")
    return text


def is_question(sentence: str) -> bool:
    """True for ``...?`` and for sentences opening with a question word ("is it a hole", "where")."""
    text = _plain(sentence)
    first = text.split(" ", 1)[0] if text else ""
    return sentence.strip().endswith("?") or first in _words()["question_openers"]


def product_statement(sentence: str) -> str | None:
    """The product a sentence names ("The product is a tile" -> ``tile``, "it's a bottle cap" -> ``bottle cap``), or
    None. "it's a scratch" and "this is fine" name no product (defect and judgement words are not products)."""
    if is_question(sentence):
        return None
    text = _strip_fillers(_plain(sentence))
    w = _words()
    for i, pattern in enumerate(_PRODUCT_PATTERNS):
        m = pattern.match(text)
        if not m:
            continue
        name = _clean_name(m.group("name"))
        if not name or len(name.split()) > w["max_product_words"]:
            return None
        if not _could_be_product(name, article=i < _EXPLICIT or bool(m.groupdict().get("art"))):
            return None
        return name
    return None


def _clean_name(name: str) -> str:
    words = [x for x in name.strip().split() if x]
    while words and words[-1] in _words()["name_tail_words"]:
        words.pop()  # "a tile here", "a bottle cap, please"
    return " ".join(words).strip(" -'")


def _could_be_product(name: str, *, article: bool) -> bool:
    """ "it's a tile" names a product; "it's a scratch", "it's fine", "it's a false alarm" do not."""
    w = _words()
    stems = {stem(x) for x in name.split()}
    if not article and stem(name.split()[-1]) not in {stem(p.split()[-1]) for p in _known_products()}:
        return False  # "it's broken", "they're fine": without an article only a known product name counts
    not_products = {stem(x) for x in w["not_products"]}
    return not (stems & not_products) and not any(p in name for p in w["not_product_phrases"])


def _known_products() -> set[str]:
    try:
        from vlad.finegrained import object_names
        from vlad.resources import load_prompt_file

        return set(object_names(load_prompt_file("filo")))
    except Exception:  # noqa: BLE001 - no phrase bank: no known names, the article decides
        return set()


def _strip_fillers(text: str) -> str:
    """Chat words around a statement off: "ok, so", "please", "from now on", "btw"."""
    w = _words()
    changed = True
    while changed:
        changed = False
        for filler in w["leading_fillers"]:
            if text.startswith(filler + " ") or text.startswith(filler + ","):
                text, changed = text[len(filler) :].lstrip(" ,"), True
        for filler in w["trailing_fillers"]:
            if text.endswith(" " + filler) or text.endswith("," + filler):
                text, changed = text[: -len(filler)].rstrip(" ,"), True
    for filler in w["anywhere_fillers"]:
        text = re.sub(rf"(?:^|,?\s+){re.escape(filler)}(?:,|\s+|$)", " ", text).strip(" ,")
    return re.sub(r"\s+", " ", text).strip(" ,")


def rule_statement(sentence: str) -> tuple[str, list[str]] | None:
    """A rule sentence's cleaned text and the parser's ``I understood`` lines, or None when it is not a rule.

    A rule has a rule word ("ignore", "fine", "critical", "reject", ...), is not a question, is read completely by the
    deterministic rule parser, and is about something other than "it" or "this" ("that is fine" is a judgement, not
    a rule)."""
    if is_question(sentence):
        return None
    text = _strip_fillers(_plain(sentence))
    w = _words()
    words = text.split()
    if not words or words[0] in w["pronouns"]:
        return None
    padded = f" {text} "
    if not any(f" {cue} " in padded for cue in w["rule_words"]):
        return None
    from vlad.errors import ConfigError
    from vlad.rules import parse_rules

    try:
        report = parse_rules(text)
    except ConfigError:
        return None
    if not report.ok or not (report.rules.rules or report.rules.policy.text):
        return None
    if any(_plain(str(getattr(r, "concept", None) or "")) in w["pronouns"] for r in report.rules.rules):
        return None
    return text, list(report.understood)


def understand(text: str) -> Understood:
    """Splits a message into its product statement, its rules and the question left (see the module docstring)."""
    out = Understood()
    rest: list[str] = []
    for sentence in split_sentences(text):
        product = product_statement(sentence)
        if product is not None:
            out.product = product
            continue
        rule = rule_statement(sentence)
        if rule is not None:
            out.rules.append(rule[0])
            out.understood += rule[1]
            continue
        rest.append(sentence)
    out.question = " ".join(rest).strip()
    return out
