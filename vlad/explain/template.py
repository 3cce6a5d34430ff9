"""The template backend: grounded words built from the detector's facts alone, no language model.

It is the default, so explanations and the fact questions of a conversation ("where?", "how big?", "how sure?",
"what rule fired?", "why?", "is it a hole?", "would you reject this?") work with nothing installed or running. Every
sentence is a template in ``prompts/explain.yaml`` filled from the facts of :func:`vlad.explain.evidence.build_facts`;
questions it cannot answer from facts get a plain statement that a language model is needed and how to configure
one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from vlad.explain.schema import AnomalyReport
from vlad.resources import load_prompt_file
from vlad.result import UNCLASSIFIED

SPEC = "template"
_INTENT_ORDER = ("verdict", "decision", "kind", "location", "size", "confidence", "rules", "why")
_WORD = re.compile(r"[a-z0-9][a-z0-9'-]*")


def prompts() -> dict[str, Any]:
    """``prompts/explain.yaml`` (cached by :func:`vlad.resources.load_prompt_file`)."""
    return load_prompt_file("explain")


class TemplateBackend:
    """No model: answers from the facts. ``is_model`` is False, which tells the conversation to call :meth:`answer`."""

    spec = SPEC
    is_model = False

    def answer(self, question: str, facts: dict[str, Any]) -> Iterator[str]:
        """Yields the answer to ``question`` from ``facts`` (one chunk; the interface streams like the others)."""
        yield answer(question, facts)

    def check(self) -> list[tuple[str, bool | None, str]]:
        return [("backend", True, "template: no language model; explanations from the detector's facts")]


# ---------------------------------------------------------------------- explanation and report
def explain_text(facts: dict[str, Any]) -> str:
    """The template explanation: verdict, regions, rules, cautions, in a few sentences."""
    t = prompts()["template"]
    parts = [_verdict_sentence(facts), _regions_sentence(facts)]
    if facts["rule_hits"]:
        items = ", ".join(t["rule_item"].format(rule=h["rule"], effect=h["effect"]) for h in facts["rule_hits"])
        parts.append(t["rules"].format(items=items))
    if facts["warnings"]:
        parts.append(t["warnings"].format(items="; ".join(facts["warnings"])))
    if facts.get("process_note"):
        parts.append(t["process_note"])
    return " ".join(p.strip() for p in parts if p)


def template_report(facts: dict[str, Any]) -> AnomalyReport:
    """A report restating the detector's judgement (the template has no opinion of its own).

    ``severity`` is a heuristic of ours: ``none`` when normal; ``critical`` when the normalised score is at least 0.9
    and the regions cover at least 10 % of the image; ``major`` when the normalised score is at least 0.75 or the
    regions cover at least 5 %; ``minor`` otherwise. ``confidence`` is the distance of the normalised score from the
    threshold, ``2 * |normalized_score - 0.5|``.
    """
    anomalous = facts["verdict"] == "anomalous"
    norm, area = facts["normalized_score"], facts["total_area_fraction"]
    if not anomalous:
        severity = "none"
    elif norm >= 0.9 and area >= 0.1:
        severity = "critical"
    elif norm >= 0.75 or area >= 0.05:
        severity = "major"
    else:
        severity = "minor"
    regions = facts["regions"]
    positions = list(dict.fromkeys(r["position"] for r in regions))[:3] or [facts["peak"]["position"]]
    return AnomalyReport(
        verdict=facts["verdict"],
        defect_type=(regions[0].get("defect_type") or "anomaly")
        if anomalous and regions
        else ("anomaly" if anomalous else "none"),
        location=", ".join(positions) if anomalous else "none",
        severity=severity,
        rationale=f"{_verdict_sentence(facts)} {_regions_sentence(facts)}".strip(),
        model_says_anomalous=anomalous,
        confidence=round(min(1.0, abs(norm - 0.5) * 2.0), 4),
    )


def _margin(facts: dict[str, Any]) -> str:
    m = prompts()["template"]["margins"]
    distance = abs(facts["normalized_score"] - 0.5)
    return m["far"] if distance >= 0.35 else m["clear"] if distance >= 0.1 else m["near"]


def _verdict_sentence(facts: dict[str, Any]) -> str:
    t = prompts()["template"]
    return t[facts["verdict"]].format(margin=_margin(facts), **_numbers(facts))


def _numbers(facts: dict[str, Any]) -> dict[str, Any]:
    keys = ("object", "scorer", "verdict", "pred_score", "normalized_score", "threshold")
    return {k: facts[k] for k in keys}


def _noun(n: int, noun: str) -> str:
    return f"One {noun}" if n == 1 else f"{n} {noun}s"


def _type_part(defect_type: str | None) -> str:
    """``, looks like a crack`` / ``, defect type unclassified`` / nothing, after a region's position and size."""
    t = prompts()["template"]
    if not defect_type:
        return ""
    if defect_type == UNCLASSIFIED:
        return t["region_unclassified"]
    return t["region_phrase"].format(phrase=defect_type)


def _count(n: int, noun: str) -> str:
    return _noun(n, noun) + (" is" if n == 1 else " are")


def _regions_sentence(facts: dict[str, Any]) -> str:
    t = prompts()["template"]
    regions = facts["regions"]
    if not regions:
        return t["no_regions"].format(position=facts["peak"]["position"])
    if all(r.get("source") == "peak" for r in regions):
        r = regions[0]
        return t["peak_region"].format(position=r["position"], percent=100 * r["area_fraction"])
    items = []
    for r in regions[:4]:
        phrase = _type_part(r.get("defect_type"))
        items.append(
            t["region_item"].format(position=r["position"], percent=100 * r["area_fraction"], phrase_part=phrase)
        )
    more = f" and {len(regions) - 4} smaller ones" if len(regions) > 4 else ""
    if facts["verdict"] == "normal":  # mid-sentence: "... although one area is above ..."
        count = _count(len(regions), "area")
        return t["normal_with_regions"].format(count_words=count[0].lower() + count[1:], items=", ".join(items) + more)
    return t["regions"].format(count_words=_count(len(regions), "area"), items=", ".join(items) + more)


# ---------------------------------------------------------------------- questions
def classify(question: str) -> list[str]:
    """The intents a question asks about, in a fixed order (``verdict, decision, kind, location, size, confidence,
    rules, why``); ``help`` alone when it only asks what can be asked; empty when nothing matches. ``kind`` is "is it
    a X?" (see :func:`kind_question`), ``decision`` is "would you reject this?"."""
    text = " " + re.sub(r"[^a-z0-9' ]+", " ", question.lower()) + " "
    intents = prompts()["intents"]
    found = [name for name in (*_INTENT_ORDER, "help") if any(f" {w} " in text for w in intents.get(name, []))]
    kinds = kind_question(question)
    if kinds:
        found.append("kind")
    elif kinds == [] and "verdict" not in found:
        found.append("verdict")  # "is it a defect?" asks for the verdict
    if "decision" in found and "verdict" in found:
        found.remove("verdict")  # the decision states the verdict
    if "why" in found and "verdict" in found:
        found.remove("verdict")  # "why is it anomalous?" asks for the reason, which states the verdict anyway
    if len(found) > 1 and "help" in found:
        found.remove("help")
    return [name for name in (*_INTENT_ORDER, "help") if name in found]


def kind_question(question: str) -> list[str] | None:
    """The defect kinds an "is it a X?" question asks about: "is it a hole?" -> ``["hole"]``, "is that a scratch or a
    crack?" -> ``["scratch", "crack"]``; ``[]`` for "is it a defect?" (a verdict question); None for other questions.
    The patterns are ``kind_questions`` in ``prompts/explain.yaml``."""
    p = prompts()
    text = " ".join(re.sub(r"[^a-z0-9' -]+", " ", question.lower()).split())
    match = next((m for m in (re.search(pat, text) for pat in p["kind_questions"]) if m), None)
    if match is None:
        return None
    stops, generic = set(p["kind_stops"]), set(p["kind_generic"])
    things: list[str] = []
    current: list[str] = []
    for word in match.group("thing").split():
        if word == "or":
            things.append(" ".join(current))
            current = []
        elif word in ("a", "an", "any", "some", "the"):
            continue
        elif word in stops:
            break
        else:
            current.append(word)
    things.append(" ".join(current))
    return [t for t in things if t and not all(w in generic for w in t.split())]


def stem(word: str) -> str:
    """A crude English stem for matching words: "scratches" ~ "scratch", "chipped" ~ "chip", "holes" ~ "hole"."""
    w = word.lower().strip("'")
    for suffix in ("ing", "ed", "es", "s"):
        if len(w) > len(suffix) + 2 and w.endswith(suffix):
            if suffix == "es" and not w.endswith(("ches", "shes", "sses", "xes", "zes")):
                suffix = "s"
            if suffix == "s" and w.endswith("ss"):
                break  # "glass"
            w = w[: -len(suffix)]
            if suffix in ("ing", "ed") and len(w) > 2 and w[-1] == w[-2]:
                w = w[:-1]  # chipped -> chip
            break
    return w


def stem_words(text: str) -> list[str]:
    """The stems of a text's words (articles and the like left out)."""
    stop = set(prompts()["understanding"]["stop_words"])
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in stop]


def answer(question: str, facts: dict[str, Any]) -> str:
    """Answers a question from the facts, or says that a language model is needed (and how to configure one)."""
    t = prompts()["template"]
    intents = classify(question)
    if not intents:
        return t["need_model"].strip()
    a = t["answers"]
    if intents == ["help"]:
        return a["help"].strip()
    builders: dict[str, Callable[[dict[str, Any]], str]] = {
        "verdict": _answer_verdict,
        "decision": _answer_decision,
        "kind": lambda f: _answer_kind(f, kind_question(question) or []),
        "location": _answer_location,
        "size": _answer_size,
        "confidence": _answer_confidence,
        "rules": _answer_rules,
        "why": _answer_why,
    }
    parts = [builders[i](facts) for i in intents if i in builders]
    if any("random weights" in w for w in facts["warnings"]) and (
        "confidence" in intents or "verdict" in intents or "decision" in intents
    ):
        parts.append(a["random"])
    return " ".join(p.strip() for p in parts)


def _answer_verdict(facts: dict[str, Any]) -> str:
    return prompts()["template"]["answers"]["verdict"].format(
        verdict=facts["verdict"], verdict_text=_verdict_sentence(facts)
    )


def _answer_location(facts: dict[str, Any]) -> str:
    a = prompts()["template"]["answers"]
    regions = facts["regions"]
    if not regions:
        return a["location_none"].format(position=facts["peak"]["position"])
    items = [
        a["location_item"].format(
            position=r["position"], x0=r["bbox"][0], y0=r["bbox"][1], x1=r["bbox"][2] - 1, y1=r["bbox"][3] - 1
        )
        for r in regions[:4]
    ]
    plural = len(regions) > 1
    return a["location_regions"].format(
        area_word="areas" if plural else "area", verb="are" if plural else "is", items=_join(items)
    )


def _answer_size(facts: dict[str, Any]) -> str:
    a = prompts()["template"]["answers"]
    regions = facts["regions"]
    if not regions:
        return a["size_none"]
    items = []
    for r in regions[:4]:
        x0, y0, x1, y1 = r["bbox"]
        items.append(
            a["size_item"].format(
                position=r["position"], percent=100 * r["area_fraction"], area=r["area"], bw=x1 - x0, bh=y1 - y0
            )
        )
    return a["size_regions"].format(
        count_words=_count(len(regions), "area"), percent=100 * facts["total_area_fraction"], items="; ".join(items)
    )


def _answer_confidence(facts: dict[str, Any]) -> str:
    a = prompts()["template"]["answers"]
    source = a["sources"].get(facts["threshold_source"], facts["threshold_source"])
    return a["confidence"].format(source=source, margin=_margin(facts), **_numbers(facts))


def _answer_rules(facts: dict[str, Any]) -> str:
    a = prompts()["template"]["answers"]
    hits = facts["rule_hits"]
    if not hits:
        return a["rules_none"]
    items = []
    for h in hits:
        detail = f" ({', '.join(f'{k}: {v}' for k, v in h['detail'].items())})" if h.get("detail") else ""
        items.append(a["rule_item"].format(rule=h["rule"], effect=h["effect"], detail=detail))
    return a["rules"].format(count_words=_noun(len(hits), "rule"), items="; ".join(items))


def _answer_why(facts: dict[str, Any]) -> str:
    text = prompts()["template"]["answers"]["why"].format(
        verdict_text=_verdict_sentence(facts), regions_text=_regions_sentence(facts)
    )
    if facts["rule_hits"]:
        text += " " + _answer_rules(facts)
    return text


def _answer_kind(facts: dict[str, Any], things: list[str]) -> str:
    """Yes / probably not / cannot tell, from each region's defect phrase; rules about the kind are named."""
    a = prompts()["template"]["answers"]
    thing = " or ".join(things)
    regions = facts["regions"]
    if not regions:
        return a["kind_none"].format(thing=thing, verdict=facts["verdict"])
    # the region's one defect type (the rules' or the closest defect description); "unclassified" names nothing
    named = [{**r, "phrase": r["defect_type"]} for r in regions if r.get("defect_type") not in (None, UNCLASSIFIED)]
    if not named:
        count = _noun(len(regions), "area")
        text = a["kind_unnamed"].format(count_words=count[0].lower() + count[1:], thing=thing)
    else:
        heads = {stem_words(t)[-1] for t in things if stem_words(t)}
        hits = [r for r in named if heads & set(stem_words(r["phrase"]))]
        if hits:
            where = _join([f"the area at the {r['position']}" for r in hits[:3]])
            text = a["kind_yes"].format(where=where, phrase=hits[0]["phrase"])
        else:
            items = _join([a["kind_item"].format(phrase=r["phrase"], position=r["position"]) for r in named[:4]])
            text = a["kind_no"].format(thing=thing, items=items)
        text += " " + a["kind_verdict"].format(verdict=facts["verdict"])
    stems = {s for t in things for s in stem_words(t)}
    for hit in facts["rule_hits"]:
        if stems & set(stem_words(hit["rule"])):
            text += " " + a["kind_rule"].format(rule=hit["rule"], effect=hit["effect"])
    return text


def _answer_decision(facts: dict[str, Any]) -> str:
    """ "Would you reject this?": the verdict, the rules that decided it, and those that only set the scorer up."""
    p = prompts()
    a = p["template"]["answers"]
    key = "decision_reject" if facts["verdict"] == "anomalous" else "decision_accept"
    parts = [a[key].format(**_numbers(facts))]
    if abs(facts["normalized_score"] - 0.5) < 0.1:
        parts.append(a["decision_near"])
    decisive = set(p["decisive_effects"])
    deciding = [h for h in facts["rule_hits"] if h["effect"] in decisive]
    if deciding:
        items = [a["decision_rule_item"].format(rule=h["rule"], effect=h["effect"]) for h in deciding]
        parts.append(a["decision_rules"].format(items="; ".join(dict.fromkeys(items))))
    else:
        parts.append(a["decision_no_rule"])
    others: dict[str, list[str]] = {}
    for h in facts["rule_hits"]:
        if h["rule"] not in {d["rule"] for d in deciding}:
            others.setdefault(h["rule"], []).append(h["effect"])
    if others:
        items = [
            a["decision_rule_item"].format(rule=rule, effect=", ".join(dict.fromkeys(effects)))
            for rule, effects in others.items()
        ]
        parts.append(a["decision_other"].format(items="; ".join(items)))
    return " ".join(parts)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
