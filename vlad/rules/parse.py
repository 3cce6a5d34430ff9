"""From the user's words to a :class:`~vlad.rules.schema.RuleSet`.

The deterministic parser splits the text into clauses (lines, ``;``, sentences) and reads each clause with a few
patterns, tried in this order:

====================  ==========================================================================================
camera scale          "12 pixels per mm", "the camera sees 12 px/mm" (sets the rule set's ``px_per_mm``)
verdict policy        "fail only on major defects", "only critical defects fail", "minor defects are fine"
required object       "a screw must be present", "there must be 2 screws", "each part must have two screws"
border band           "ignore anything within 10 pixels of the border", "ignore the edges"
sized defect          "holes bigger than 2 % of the image are critical", "reject any stain larger than 5 mm"
minimum size          "dents smaller than 1 % of the part are fine", "ignore anything under 50 pixels"
region                "only the upper half matters", "ignore the top left corner", "ignore box 0.1,0.1,0.4,0.3"
LAFT concept          "ignore colour (variation between batches)", "focus on cracks"
defect                "a missing screw is always a defect", "a bent pin is critical", "reject cracked caps"
acceptable            "scratches on the label are fine", "X is acceptable", "ignore dust on the lens",
                      "don't flag lint"
====================  ==========================================================================================

The phrase tables (synonyms, severity words, position words) are in ``prompts/rules.yaml``. A clause that no pattern
reads goes to ``not_understood`` with the reason; contradictions name both rules. Nothing is dropped silently.

The front door, :func:`vlad.rules.load.parse_rules` (also ``vlad.rules.parse_rules``), can send the text through a
language model first (:mod:`vlad.rules.lvlm`) and falls back to this parser.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from vlad.errors import ConfigError
from vlad.rules.schema import (
    DEFAULT_BORDER_PERCENT,
    AcceptableRule,
    Area,
    BorderRule,
    DefectRule,
    FocusConceptRule,
    IgnoreConceptRule,
    MinSizeRule,
    RegionRule,
    RequiredObjectRule,
    RuleSet,
    VerdictPolicy,
    area_names,
    canonical_area,
    check_box,
    check_px_per_mm,
    check_size,
    in_mm,
    laft_aliases,
    normalise_words,
    rule_tables,
    severity_rank,
    validation_message,
)

EMPTY_RULES_MESSAGE = "no rules given; write one rule per line, e.g. 'scratches on the label are fine'"
_NUM = r"-?\d+(?:\.\d+)?"
_ARTICLES = ("a", "an", "the", "any", "every", "each", "all", "some")
_POSITIONAL = frozenset("corner corners half halves third thirds quarter quarters quadrant quadrants".split())
_PREPOSITIONS = frozenset("on in at near along around inside with".split())
_BULLET = re.compile(r"^\s*(?:[-*•]+|\d+[.)])\s+")


class NotUnderstood(Exception):
    """A clause the parser recognised the shape of, but whose content is wrong (the message says what)."""


@dataclass(frozen=True)
class CameraScale:
    """A clause that sets the rule set's ``px_per_mm`` ("12 pixels per mm")."""

    px_per_mm: float
    text: str


@dataclass
class ParseReport:
    """What the parser made of the user's words.

    Attributes:
        rules: the structured rules (those understood).
        understood: one ``I understood: ...`` line per rule of ``rules``, then one for its verdict policy when it is
            given, then one for its camera scale when it is given: one line per row of ``vlad rules check``'s table.
        not_understood: one line per clause that gave no rule, quoting it and saying why.
        contradictions: one line per contradiction, naming both rules' texts.
        notes: how the text was parsed (e.g. the language model's reply was invalid and the deterministic parser was
            used instead).
        source: ``deterministic`` or the language model's spec.
    """

    rules: RuleSet
    understood: list[str] = field(default_factory=list)
    not_understood: list[str] = field(default_factory=list)
    contradictions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str = "deterministic"

    @property
    def ok(self) -> bool:
        """True when every clause was understood and no rules contradict each other."""
        return not self.not_understood and not self.contradictions

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules": self.rules.model_dump(mode="json"),
            "understood": list(self.understood),
            "not_understood": list(self.not_understood),
            "contradictions": list(self.contradictions),
            "notes": list(self.notes),
            "source": self.source,
            "ok": self.ok,
        }


def parse_deterministic(text: str) -> ParseReport:
    """The deterministic parser (see the module docstring)."""
    rules: list[Any] = []
    policies: list[VerdictPolicy] = []
    scales: list[CameraScale] = []
    not_understood: list[str] = []
    for clause in split_clauses(text):
        try:
            found = _parse_clause_or_parts(clause)
        except NotUnderstood as exc:
            not_understood.append(f"{clause!r}: {exc}")
            continue
        for item in found:
            if isinstance(item, VerdictPolicy):
                policies.append(item)
            elif isinstance(item, CameraScale):
                scales.append(item)
            else:
                rules.append(item)
    return build_report(rules, policies, not_understood, source="deterministic", scales=scales)


def build_report(
    rules: list[Any],
    policies: list[VerdictPolicy],
    not_understood: list[str],
    *,
    source: str,
    scales: list[CameraScale] | tuple[CameraScale, ...] = (),
) -> ParseReport:
    """Assembles the :class:`ParseReport`: the rule set, the understood lines, the contradictions and notes.

    The rule set holds one verdict policy and one camera scale: the last of each. An earlier one is named in the
    notes (and in the contradictions when it differs), so the understood lines are exactly what the rule set holds.
    """
    contradictions = find_contradictions(rules, policies)
    notes: list[str] = []
    for earlier in policies[:-1]:
        notes.append(f"{_quote(earlier)} is replaced by the later verdict policy {_quote(policies[-1])}")
    for earlier in scales[:-1]:
        line = f'"{earlier.text}" is replaced by the later camera scale "{scales[-1].text}"'
        if earlier.px_per_mm != scales[-1].px_per_mm:
            contradictions.append(
                f'"{earlier.text}" contradicts "{scales[-1].text}": the photos cannot have both '
                f"{earlier.px_per_mm:g} and {scales[-1].px_per_mm:g} pixels per millimetre"
            )
        notes.append(line)
    scale = scales[-1] if scales else None
    ruleset = RuleSet(
        rules=rules,
        policy=policies[-1] if policies else VerdictPolicy(),
        px_per_mm=None if scale is None else scale.px_per_mm,
        px_per_mm_text="" if scale is None else scale.text,
    )
    report = ParseReport(ruleset, understood_lines(ruleset), not_understood, contradictions, notes, source)
    report.notes += scale_notes(ruleset)
    return report


def understood_lines(ruleset: RuleSet) -> list[str]:
    """One ``I understood:`` line per rule, then the policy's and the camera scale's when given (the rows of the
    ``vlad rules check`` table, in its order)."""
    lines = [understood_line(r.text, r.describe()) for r in ruleset.rules]
    if ruleset.shows_policy:
        lines.append(understood_line(ruleset.policy.text, ruleset.policy.describe()))
    if ruleset.px_per_mm is not None:
        lines.append(understood_line(ruleset.px_per_mm_text, ruleset.describe_scale()))
    return lines


def scale_notes(ruleset: RuleSet) -> list[str]:
    """A note per rule in millimetres when the rule set has no ``px_per_mm`` (such rules are not applicable)."""
    if ruleset.px_per_mm is not None:
        return []
    return [
        f"{_quote(r)} is in millimetres: it acts only with the camera's scale; give px_per_mm in the product profile "
        "or rules file, or write e.g. '12 pixels per mm'"
        for r in ruleset.rules
        if in_mm(r)
    ]


def understood_line(text: str, description: str) -> str:
    """``I understood: <description>  (from "<text>")``."""
    return f"I understood: {description}" + (f'  (from "{text}")' if text else "")


def split_clauses(text: str) -> list[str]:
    """Lines, then ``;``, then sentences (a ``.``, ``!`` or ``?`` followed by a space); bullets and the final stop are
    removed; empty pieces are skipped. Decimal points ("1.5 %") do not split."""
    out = []
    for line in text.splitlines():
        for piece in re.split(r";|(?<=[.!?])\s+", _BULLET.sub("", line)):
            clause = piece.strip().rstrip(".!?").strip()
            if clause:
                out.append(clause)
    return out


def _parse_clause_or_parts(clause: str) -> list[Any]:
    """One clause; when it is not understood as a whole, its comma / "but" parts are tried one by one."""
    try:
        return parse_clause(clause)
    except NotUnderstood as whole:
        for splitter in (r",\s+(?:and\s+|but\s+)?|\s+but\s+", r",\s+(?:and\s+|but\s+)?|\s+but\s+|\s+and\s+"):
            parts = [p.strip() for p in re.split(splitter, clause) if p.strip()]
            if len(parts) < 2:
                continue
            try:
                return [item for part in parts for item in parse_clause(part)]
            except NotUnderstood:
                continue
        raise whole from None


def parse_clause(clause: str) -> list[Any]:
    """The rules of one clause (several for "ignore colour and lighting").

    Raises:
        NotUnderstood: no pattern reads it, or one does and the content is invalid (the message says why).
    """
    norm = _normalise(clause)
    for reader in _READERS:
        found = reader(norm, clause)
        if found is not None:
            return found
    raise NotUnderstood(
        "no rule pattern matches; write e.g. 'scratches are fine', 'a bent pin is critical', 'ignore colour', "
        "'dents smaller than 1 % of the part are fine', 'only the upper half matters', 'a screw must be present' "
        "or 'fail only on major defects'"
    )


def _normalise(clause: str) -> str:
    text = normalise_words(clause).replace("’", "'")
    text = re.sub(r"(\d)\s*%", r"\1 percent", text)
    text = re.sub(r"\bper cent\b", "percent", text)
    text = re.sub(r"(\d)(?=mm|px|pixel|millimet)", r"\1 ", text)
    text = re.sub(r"\b(?:square (?:millimet(?:re|er)s?|mm)|sq\.? ?mm|mm\^?2|mm²)", "mm2", text)
    text = re.sub(r"\bmillimet(?:re|er)s?\b", "mm", text)
    text = re.sub(r"\b(pixels?|px) ?/ ?mm\b", r"\1 per mm", text)
    text = re.sub(r"[()\"]", " ", text)
    return " ".join(text.split()).strip(" ,:")


# ---------------------------------------------------------------------------------------------------- tables
def _words(key: str) -> list[str]:
    return [normalise_words(str(w)) for w in rule_tables()[key]]


def _alt(words: list[str]) -> str:
    """A regex alternation of phrases, longest first."""
    return "(?:" + "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True)) + ")"


def _severity_of(word: str) -> str:
    for severity, words in rule_tables()["severity_words"].items():
        if word in (normalise_words(w) for w in words):
            return severity
    raise KeyError(word)


def _sev_alt() -> str:
    return _alt([normalise_words(w) for words in rule_tables()["severity_words"].values() for w in words])


def _count(word: str) -> int:
    if re.fullmatch(r"\d+", word):
        return int(word)
    return int(rule_tables()["numbers"][word])


def _count_alt() -> str:
    return rf"(?:\d+|{_alt(list(rule_tables()['numbers']))})"


def _strip_articles(text: str) -> str:
    words = text.split()
    while words and words[0] in (*_ARTICLES, "always", "also"):
        words = words[1:]
    return " ".join(words)


def _check_subject(subject: str) -> str:
    """Articles removed; a subject holding a comma, or a verb before an "and", is more than one rule; one holding a
    measure ("10 pixels") is a size or distance no pattern read, never a kind of defect."""
    if re.search(r",| (?:is|are|must|should) .*\band ", subject):
        raise NotUnderstood("this holds more than one rule; put each rule on its own line or after a ';'")
    if re.search(rf"(?:^|\s){_NUM} ?(?:percent|pixels?|px|mm2?)\b", subject):
        raise NotUnderstood(
            "this holds a size or distance that no rule pattern reads; write e.g. 'ignore anything within 10 pixels "
            "of the border', 'dents smaller than 1 % are fine' or 'holes bigger than 2 % of the image are critical'"
        )
    return _strip_articles(subject)


def _is_generic(subject: str) -> bool:
    return _strip_articles(subject) in _words("generic_subjects") or subject in _words("generic_subjects")


def singular(word: str) -> str:
    """A crude English singular of the last word ("screws" -> "screw", "boxes" -> "box", "batteries" -> "battery")."""
    head, _, last = word.rpartition(" ")
    if len(last) > 3 and last.endswith("ies"):
        last = last[:-3] + "y"
    elif len(last) > 3 and re.search(r"(?:ss|x|ch|sh|z)es$", last):
        last = last[:-2]
    elif len(last) > 2 and last.endswith("s") and not last.endswith(("ss", "us", "is")):
        last = last[:-1]
    return f"{head} {last}".strip()


def concept_key(concept: str) -> str:
    """How two concept phrases are compared: lower case, articles removed, each word singular."""
    return " ".join(singular(w) for w in _strip_articles(normalise_words(concept)).split())


# ---------------------------------------------------------------------------------------------------- readers
def _read_policy(norm: str, text: str) -> list[Any] | None:
    sev = _sev_alt()
    noun = r"(?:defects?|problems?|faults?|issues?|flaws?|anomal(?:y|ies))"
    patterns = [
        rf"^(?:only )?(?:fail|reject)(?: the part| parts| a part)?(?: only)? (?:on|for|with|at|if there (?:is|are)|"
        rf"when there (?:is|are))(?: an?)?(?: only)? (?P<sev>{sev})(?: {noun})?(?: or (?:worse|higher|above|more))?$",
        rf"^only (?P<sev>{sev})(?: {noun})? (?:fail|fails|count|counts|matter|matters|reject|rejects)"
        rf"(?: the part| parts| a part)?$",
        rf"^(?:fail|reject)(?: the part| parts)? (?:on |for |at )?(?P<any>any|every|all) {noun}$",
    ]
    for pattern in patterns:
        m = re.match(pattern, norm)
        if m:
            fail_at = "minor" if m.groupdict().get("any") else _severity_of(m.group("sev"))
            return [VerdictPolicy(fail_at=fail_at, text=text)]
    m = re.match(rf"^(?:all |any )?(?P<sev>{sev}) {noun} (?:are|is) {_alt(_words('acceptable_words'))}$", norm)
    if m:
        below = _severity_of(m.group("sev"))
        if below == "critical":
            raise NotUnderstood("critical is the highest severity: accepting critical defects would pass every part")
        return [VerdictPolicy(fail_at=("major", "critical")[severity_rank(below)], text=text)]
    return None


def _read_scale(norm: str, text: str) -> list[Any] | None:
    who = r"(?:the )?(?:camera|photos?|images?|pictures?|scale|resolution|image scale|camera scale|optics)"
    verb = r"(?: (?:is|are|sees|see|has|have|gives|give|shows|show|of))?"
    m = re.match(rf"^(?:{who}{verb}:? )?(?P<num>{_NUM}) (?:pixels?|px) (?:per|a|an|each|every) mm$", norm)
    if not m:
        return None
    try:
        value = check_px_per_mm(float(m.group("num")))
    except ValueError as exc:
        raise NotUnderstood(str(exc)) from None
    assert value is not None
    return [CameraScale(value, text)]


def _read_required(norm: str, text: str) -> list[Any] | None:
    count = _count_alt()
    end = r"(?: present| there| visible| in place| in the image| on the part| installed| fitted| mounted)?"
    patterns = [
        rf"^there (?:must|should|has to|have to|needs to|need to) be (?:at least )?(?P<n>{count}) (?P<obj>.+?){end}$",
        rf"^(?:at least )?(?P<n>{count} )?(?P<obj>.+?) (?:must|should|has to|have to|needs to|need to) be "
        rf"(?:present|there|visible|in place|installed|fitted|mounted)$",
        rf"^(?:each|every|the|a) (?:part|product|object|item|unit) (?:must|should|needs to|has to) (?:have|contain|"
        rf"show) (?:at least )?(?P<n>{count}) (?P<obj>.+?)$",
    ]
    for pattern in patterns:
        m = re.match(pattern, norm)
        if m:
            n_word = (m.group("n") or "").strip()
            n = _count(n_word) if n_word else 1
            obj = _check_subject(m.group("obj"))
            if n < 1:
                raise NotUnderstood(f"a required object needs a count of at least 1, got {n}")
            if not obj or _is_generic(obj):
                raise NotUnderstood("name the object that must be present, e.g. 'a screw must be present'")
            return [RequiredObjectRule(object=singular(obj) if n_word else obj, min_count=n, text=text)]
    return None


_SIZE_HINT = (
    "looks like a size rule; write e.g. 'defects smaller than 2 % of the image are fine', "
    "'dents smaller than 1 % of the part are fine', 'ignore anything under 50 pixels', "
    "'holes bigger than 2 % of the image are critical' or 'reject any stain larger than 5 mm'"
)
_SMALLER = r"(?:smaller than|less than|under|below|beneath|up to|no larger than|not larger than|no bigger than|at most)"
_LARGER = r"(?:larger than|bigger than|greater than|longer than|wider than|more than|over|above|exceeding|at least)"
_UNIT = r"(?P<unit>percent|pixels?|px|mm2|mm)"
_BAND = r"(?:image |picture |photo |outer )?(?:borders?|edges?|margins?)(?: of the (?:image|picture|photo))?"
_BAND_UNITS = {"pixel": "pixels", "pixels": "pixels", "px": "pixels", "percent": "percent_side", "mm": "mm"}


def _read_border(norm: str, text: str) -> list[Any] | None:
    ignore = _alt(_words("ignore_verbs"))
    things = (
        r"(?:(?:anything|everything|all|defects|anomalies|regions|findings|any defects?|any regions?|all defects|"
        r"all regions) )?(?:that (?:is|are|lies|lie) )?"
    )
    unit = r"(?P<unit>pixels?|px|percent|mm)"
    sized = [
        rf"^{ignore} {things}(?:within|less than|closer than|inside|up to|under) (?P<num>{_NUM}) {unit} "
        rf"(?:of|from|to) (?:the )?{_BAND}$",
        rf"^{ignore} (?:the |an? )?(?:outer(?:most)? )?(?P<num>{_NUM}) {unit}(?: wide)?"
        rf"(?: {_BAND}| (?:at|along|around|near) (?:the )?{_BAND})$",
        rf"^{ignore} (?:the )?outer(?:most)? (?P<num>{_NUM}) {unit}$",
    ]
    for pattern in sized:
        m = re.match(pattern, norm)
        if m:
            width, unit_name = float(m.group("num")), _BAND_UNITS[m.group("unit")]
            try:
                check_size(width, unit_name)
            except ValueError as exc:
                raise NotUnderstood(str(exc)) from None
            return [BorderRule(width=width, unit=unit_name, text=text)]
    plain = [
        rf"^{ignore} {things}(?:(?:at|along|around|near|on) )?(?:the |all )?{_BAND}$",
        rf"^(?:the )?{_BAND} (?:doesn't matter|does not matter|don't matter|do not matter|is irrelevant|"
        r"are irrelevant|can be ignored|are not inspected|is not inspected)$",
    ]
    if any(re.match(pattern, norm) for pattern in plain):
        return [BorderRule(width=DEFAULT_BORDER_PERCENT, unit="percent_side", text=text)]
    return None


def _read_sized_defect(norm: str, text: str) -> list[Any] | None:
    sev = _sev_alt()
    adverbs = r"(?:(?:always|also|definitely|still|considered|treated as|to be treated as|counted as|counts as) )*"
    of = r"(?: of (?:the |an? )?(?P<of>[a-z ]+?))?"
    size = rf"{_LARGER}(?: an area of)? (?P<num>{_NUM}) {_UNIT}{of}(?: in (?:size|area|length|diameter))?"
    subject = r"(?P<subj>.+? )?(?:that (?:is|are) |which (?:is|are) )?"
    patterns = [
        rf"^{subject}{size} (?:is|are|counts as|count as) {adverbs}(?:an? )?(?:(?P<sev>{sev}) )?"
        rf"{_alt(_words('defect_nouns'))}$",
        rf"^{subject}{size} (?:is|are) {adverbs}(?P<sev>{sev})$",
        rf"^{subject}{size} (?:is|are) {adverbs}{_alt(_words('defect_words'))}$",
        rf"^{_alt(_words('defect_verbs'))} (?:parts? with |anything with |any )?{subject}{size}$",
        rf"^{subject}{size} (?:must|should) {adverbs}(?:be )?(?:rejected|flagged|fail|failed)$",
    ]
    for pattern in patterns:
        m = re.match(pattern, norm)
        if m:
            value, unit = _size_of(m)
            concept = _size_subject(m)
            severity = _severity_of(m.group("sev")) if m.groupdict().get("sev") else "major"
            return [DefectRule(concept=concept, severity=severity, min_size=value, unit=unit, text=text)]
    return None


def _read_size(norm: str, text: str) -> list[Any] | None:
    accept = _alt(_words("acceptable_words"))
    verbs = _alt(_words("ignore_verbs") + _words("acceptable_verbs"))
    of = r"(?: of (?:the |an? )?(?P<of>[a-z ]+?))?"
    size = rf"{_SMALLER}(?: an area of)? (?P<num>{_NUM}) ?{_UNIT}{of}(?: in (?:size|area))?"
    patterns = [
        rf"^(?P<subj>.+? )?(?:that are |which are |that is |which is )?{size} (?:are|is) {accept}$",
        rf"^{verbs} (?P<subj>.+? )?(?:that are |which are )?{size}$",
        rf"^only (?P<subj>.+? )?(?:larger|bigger|greater) than (?P<num>{_NUM}) ?{_UNIT}(?: of (?:the |an? )?"
        rf"(?P<of>[a-z ]+?))? (?:count|counts|matter|matters|fail|are defects)$",
    ]
    for pattern in patterns:
        m = re.match(pattern, norm)
        if m:
            return [_size_rule(m, text)]
    if re.search(rf"{_SMALLER} {_NUM}|(?:larger|bigger) than {_NUM}", norm):
        raise NotUnderstood(_SIZE_HINT)
    return None


def _size_rule(m: re.Match[str], text: str) -> MinSizeRule:
    value, unit = _size_of(m)
    return MinSizeRule(value=value, unit=unit, concept=_size_subject(m), text=text)


def _size_of(m: re.Match[str]) -> tuple[float, str]:
    """The size and its unit of a size pattern's match (``num``, ``unit`` and ``of`` groups)."""
    value = float(m.group("num"))
    of = (m.group("of") or "").strip()
    if m.group("unit") in ("pixel", "pixels", "px"):
        unit = "pixels"
    elif m.group("unit") in ("mm", "mm2"):
        unit = m.group("unit")
    elif not of or of in _words("image_words"):
        unit = "percent_image"
    else:
        unit = "percent_object"
    try:
        check_size(value, unit)
    except ValueError as exc:
        raise NotUnderstood(str(exc)) from None
    return value, unit


def _size_subject(m: re.Match[str]) -> str | None:
    """The concept a size rule names, or None for words that mean any region ("defects", "anything", "specks")."""
    subject = _check_subject((m.group("subj") or "").strip())
    if not subject or _is_generic(subject) or subject in _words("size_subjects"):
        return None
    return _strip_articles(subject) or None


def parse_areas(words: str) -> list[str]:
    """``"the top left and top right corners"`` -> ``["top left", "top right"]``.

    Raises:
        NotUnderstood: a part that names no known area (the message lists the allowed ones).
    """
    fillers = sorted(_words("area_fillers"), key=len, reverse=True)
    out = []
    for part in re.split(r",\s*(?:and |or )?|\s+and\s+|\s+or\s+|\s*&\s*", words):
        part = _strip_articles(part.strip())
        name = canonical_area(part) if part else None  # "left side" is a synonym before "side" is filler
        for filler in fillers:
            part = re.sub(rf"\s*\b{re.escape(filler)}$", "", part).strip()
        name = name or (canonical_area(part) if part else None)
        if name is None:
            raise NotUnderstood(f"unknown position {part or words!r}; allowed: {', '.join(area_names())}")
        out.append(name)
    return out


def _looks_like_area(words: str, *, strict: bool = True) -> bool:
    """True for a box, or words that start with a position word ("upper ...") and, when ``strict``, hold nothing but
    position words and fillers ("the upper-left corners", but not "left-over glue")."""
    if re.search(rf"\[?{_NUM}\s*,", words):
        return True
    hints = set(_words("area_hints"))
    allowed = hints | {t for f in _words("area_fillers") for t in f.split()} | {"and", "or", "the", "of", "&"}
    tokens = [t for t in re.split(r"[\s,-]+", _strip_articles(words)) if t]
    if not tokens:
        return False
    if _POSITIONAL & set(tokens) and not _PREPOSITIONS & set(tokens):
        return True  # "the foo corner": meant as an area, so an unknown word is an error that lists the allowed ones
    if tokens[0] not in hints:
        return False
    return not strict or all(t in allowed for t in tokens)


def _area_rule(mode: str, words: str, text: str) -> RegionRule:
    m = re.search(rf"\[?\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]?", words)
    if m:
        try:
            box = check_box([float(v) for v in m.groups()])
        except ValueError as exc:
            raise NotUnderstood(str(exc)) from None
        return RegionRule(mode=mode, box=box, text=text)
    return RegionRule(mode=mode, positions=parse_areas(words), text=text)


def _read_region(norm: str, text: str) -> list[Any] | None:
    only = _alt(_words("only_suffixes"))
    ignore = _alt(_words("ignore_verbs"))
    things = r"(?:(?:defects|anomalies|regions|anything|everything|findings) (?:in|on|at|inside|within) )?"
    only_patterns = [
        rf"^only {things}(?:the )?(?P<area>.+?) {only}$",
        rf"^(?:only (?:inspect|check|look at)|(?:inspect|check) only) {things}(?:the )?(?P<area>.+)$",
    ]
    for pattern in only_patterns:
        m = re.match(pattern, norm)
        if m and _looks_like_area(m.group("area"), strict=False):
            return [_area_rule("only", m.group("area"), text)]
    ignore_patterns = [
        rf"^{ignore} {things}(?:the )?(?P<area>.+)$",
        r"^(?:the )?(?P<area>.+?) (?:doesn't matter|does not matter|is irrelevant|can be ignored|is not inspected|"
        r"is not relevant)$",
    ]
    for pattern in ignore_patterns:
        m = re.match(pattern, norm)
        if m and _looks_like_area(m.group("area")):
            return [_area_rule("ignore", m.group("area"), text)]
    return None


def laft_concepts_in(words: str) -> list[str] | None:
    """The LAFT concepts ``words`` name, when every other word is filler; None otherwise."""
    aliases = laft_aliases()
    longest = max(len(a.split()) for a in aliases)
    fillers = set(_words("concept_fillers"))
    tokens = re.sub(r"[,/&]", " ", words).split()
    found: list[str] = []
    i = 0
    while i < len(tokens):
        for n in range(min(longest, len(tokens) - i), 0, -1):
            name = aliases.get(" ".join(tokens[i : i + n]))
            if name is not None:
                if name not in found:
                    found.append(name)
                i += n
                break
        else:
            if tokens[i] not in fillers:
                return None
            i += 1
    return found or None


def _read_laft(norm: str, text: str) -> list[Any] | None:
    m = re.match(rf"^(?:{_alt(_words('ignore_verbs'))}) (?P<rest>.+)$", norm)
    if m:
        names = laft_concepts_in(m.group("rest"))
        return None if names is None else [IgnoreConceptRule(concept=n, text=text) for n in names]
    m = re.match(rf"^(?:{_alt(_words('focus_verbs'))}) (?P<rest>.+)$", norm)
    if m:
        names = laft_concepts_in(m.group("rest"))
        if names is None:
            known = ", ".join(sorted(set(laft_aliases().values())))
            raise NotUnderstood(f"'focus on' needs a LAFT concept; known concepts: {known}")
        return [FocusConceptRule(concept=n, text=text) for n in names]
    return None


def _read_defect(norm: str, text: str) -> list[Any] | None:
    sev = _sev_alt()
    adverbs = r"(?:(?:always|also|definitely|still|considered|treated as|to be treated as|counted as|counts as) )*"
    patterns = [
        rf"^(?P<subj>.+?) (?:is|are|counts as|count as) {adverbs}(?:an? )?(?:(?P<sev>{sev}) )?"
        rf"{_alt(_words('defect_nouns'))}$",
        rf"^(?P<subj>.+?) (?:is|are) {adverbs}(?P<sev>{sev})$",
        rf"^(?P<subj>.+?) (?:is|are) {adverbs}{_alt(_words('defect_words'))}$",
        rf"^{_alt(_words('defect_verbs'))} (?:parts? with |anything with |any )?(?P<subj>.+)$",
        rf"^(?P<subj>.+?) (?:must|should) {adverbs}(?:be )?(?:rejected|flagged|fail|failed)$",
    ]
    for pattern in patterns:
        m = re.match(pattern, norm)
        if m:
            subject = _check_subject(m.group("subj"))
            if not subject or _is_generic(subject):
                raise NotUnderstood(
                    "this names no kind of defect; to set which severity fails a part write "
                    "e.g. 'fail only on major defects'"
                )
            severity = _severity_of(m.group("sev")) if m.groupdict().get("sev") else "major"
            return [DefectRule(concept=subject, severity=severity, text=text)]
    return None


def _read_acceptable(norm: str, text: str) -> list[Any] | None:
    adverbs = r"(?:(?:always|usually|generally|perfectly|completely|totally|all|considered|also) )*"
    patterns = [
        rf"^(?P<subj>.+?) (?:is|are) {adverbs}{_alt(_words('acceptable_words'))}$",
        rf"^{_alt(_words('acceptable_verbs'))} (?P<subj>.+)$",
        rf"^(?P<subj>.+?) {_alt(_words('acceptable_suffixes'))}$",
        r"^(?:it is |it's )?(?:fine|ok|okay|acceptable) (?:if there (?:is|are)|to have) (?P<subj>.+)$",
        r"^(?P<subj>.+?) (?:must|should|need|needs to|shall) (?:not|never) (?:be )?(?:flagged|rejected|failed|"
        r"reported)$",
        rf"^{_alt(_words('ignore_verbs'))} (?P<subj>.+)$",
    ]
    for pattern in patterns:
        m = re.match(pattern, norm)
        if m:
            return [_acceptable_rule(m.group("subj"), text)]
    return None


def _acceptable_rule(subject: str, text: str) -> AcceptableRule:
    subject = _check_subject(subject)
    if not subject or _is_generic(subject):
        raise NotUnderstood("this would accept every finding; name the kind, e.g. 'scratches are fine'")
    m = re.match(r"^(?P<concept>.+?) (?:on|in|at|near|along|around|inside) (?:the |a |an )?(?P<loc>.+)$", subject)
    if not m:
        return AcceptableRule(concept=subject, text=text)
    concept, loc = _strip_articles(m.group("concept")), m.group("loc")
    if _looks_like_area(loc):
        return AcceptableRule(concept=concept, where=Area(positions=parse_areas(loc)), text=text)
    return AcceptableRule(concept=concept, where=Area(object=loc), text=text)


_READERS: tuple[Callable[[str, str], list[Any] | None], ...] = (
    _read_scale,
    _read_policy,
    _read_required,
    _read_border,
    _read_sized_defect,
    _read_size,
    _read_region,
    _read_laft,
    _read_defect,
    _read_acceptable,
)


# ---------------------------------------------------------------------------------------------------- contradictions
def find_contradictions(rules: list[Any], policies: list[VerdictPolicy]) -> list[str]:
    """Pairs of rules that cannot both hold, each line naming both rules' texts."""
    out: list[str] = []
    for i, a in enumerate(rules):
        for b in rules[i + 1 :]:
            why = _conflict(a, b) or _conflict(b, a)
            if why:
                out.append(f"{_quote(a)} contradicts {_quote(b)}: {why}")
    for i, a in enumerate(policies):
        for b in policies[i + 1 :]:
            if a.fail_at != b.fail_at:
                out.append(
                    f"{_quote(a)} contradicts {_quote(b)}: the part cannot fail at both {a.fail_at} and "
                    f"{b.fail_at} defects"
                )
    return out


def _quote(rule: Any) -> str:
    return f'"{rule.label}"'


def _same_concept(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and concept_key(a) == concept_key(b)


def _conflict(a: Any, b: Any) -> str | None:
    if isinstance(a, AcceptableRule) and a.where is None and isinstance(b, DefectRule):
        if _same_concept(a.concept, b.concept):
            return f"{b.concept} is both acceptable and a {b.severity} defect"
    if isinstance(a, DefectRule) and isinstance(b, DefectRule) and a.severity != b.severity:
        if _same_concept(a.concept, b.concept) and (a.min_size, a.unit) == (b.min_size, b.unit):
            return f"{a.concept} is given two severities, {a.severity} and {b.severity}"
    if isinstance(a, IgnoreConceptRule) and isinstance(b, FocusConceptRule) and a.concept == b.concept:
        return f"{a.concept} is both ignored and focused on"
    if isinstance(a, IgnoreConceptRule) and isinstance(b, DefectRule) and b.concept is not None:
        if laft_concepts_in(normalise_words(b.concept)) == [a.concept]:
            return f"{a.concept} is projected out of the features but also named a defect"
    if isinstance(a, RegionRule) and isinstance(b, RegionRule) and a.mode == "only" and b.mode == "ignore":
        if all(any(_inside(box, other) for other in b.area.boxes()) for box in a.area.boxes()):
            return "the only region that matters is also ignored, so nothing would be inspected"
    return None


def _inside(inner: tuple[float, ...], outer: tuple[float, ...]) -> bool:
    eps = 1e-6
    return (
        outer[0] - eps <= inner[0]
        and outer[1] - eps <= inner[1]
        and inner[2] <= outer[2] + eps
        and (inner[3] <= outer[3] + eps)
    )


def report_from_ruleset(ruleset: RuleSet, *, source: str, clauses: list[str] | None = None) -> ParseReport:
    """A :class:`ParseReport` for an already structured rule set (a YAML file or a language model's reply).

    When ``clauses`` is given, a clause that no rule's ``text`` quotes is reported as not understood.
    """
    policies = [ruleset.policy] if ruleset.shows_policy else []
    not_understood = []
    if clauses is not None:
        texts = [r.text for r in [*ruleset.rules, *policies]] + [ruleset.px_per_mm_text]
        quoted = {_clause_key(t) for t in texts if t}
        not_understood = [f"{c!r}: no rule was made of it" for c in clauses if _clause_key(c) not in quoted]
    scales = [] if ruleset.px_per_mm is None else [CameraScale(ruleset.px_per_mm, ruleset.px_per_mm_text)]
    return build_report(list(ruleset.rules), policies, not_understood, source=source, scales=scales)


def _clause_key(text: str) -> str:
    return " ".join(re.sub(r"[^\w%]+", " ", text.lower()).split())


def validate_ruleset_data(data: Any) -> RuleSet:
    """A RuleSet from parsed JSON, with a one-line ConfigError when it is invalid."""
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid rule set: {validation_message(exc)}") from exc
