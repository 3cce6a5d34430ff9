"""Natural-language anomaly rules: users say what counts as a defect, and every verdict says which rule fired.

``import vlad.rules`` needs pydantic, PyYAML, numpy and scipy; torch loads only when a rule needs CLIP or LAFT.

Example:
    >>> from vlad.rules import parse_rules, configure_scorer, apply_rules
    >>> report = parse_rules("scratches on the label are fine\\na bent pin is critical\\nignore colour")
    >>> print("\\n".join(report.understood))                                         # doctest: +SKIP
    >>> hits = configure_scorer(scorer, report.rules)                                 # doctest: +SKIP
    >>> result = apply_rules(scorer.score(image, "pcb"), report.rules, image=image,   # doctest: +SKIP
    ...                      backbone=scorer.backbone, object_name="pcb", scorer_hits=hits)
    >>> [(h.rule, h.effect) for h in result.rule_hits]                                # doctest: +SKIP

See docs/rules.md for the phrasings the parser understands and the rule file format.
"""

from __future__ import annotations

from vlad.rules.apply import apply_rules, configure_scorer
from vlad.rules.load import load_rules_arg, parse_rules
from vlad.rules.parse import ParseReport
from vlad.rules.schema import (
    AcceptableRule,
    Area,
    BorderRule,
    DefectRule,
    FocusConceptRule,
    IgnoreConceptRule,
    MinSizeRule,
    ProductProfile,
    RegionRule,
    RequiredObjectRule,
    RuleSet,
    VerdictPolicy,
    load_profile,
    load_rules,
    save_profile,
    save_rules,
)

__all__ = [
    "AcceptableRule",
    "Area",
    "BorderRule",
    "DefectRule",
    "FocusConceptRule",
    "IgnoreConceptRule",
    "MinSizeRule",
    "ParseReport",
    "ProductProfile",
    "RegionRule",
    "RequiredObjectRule",
    "RuleSet",
    "VerdictPolicy",
    "apply_rules",
    "configure_scorer",
    "load_profile",
    "load_rules",
    "load_rules_arg",
    "parse_rules",
    "save_profile",
    "save_rules",
]
