"""Dataset defect names versus prompt phrases: a guard against test labels leaking into text prompts.

A benchmark's defect names (MVTec AD's test folder names, VisA's ``image_anno.csv`` labels) are test labels. A prompt
file that repeats them (``glue strip``, ``faulty imprint``, ``cable swap``) tunes a zero-shot method to the test set.
:func:`prompt_overlap_warnings` lists, per evaluated category, the defect names that a scorer's prompt phrases share.

The comparison is on normalised text (lower case, ``_`` and ``-`` as spaces, British spellings ``colour`` and
``grey`` as ``color`` and ``gray``, punctuation dropped). A defect name is shared when

- it has two or more words and occurs, as whole words, inside a phrase (``a glue strip on the tile``), or
- it is one word outside :data:`GENERIC_DEFECT_WORDS` and a phrase is exactly that word (``poke``, a bare label).

One-word names inside longer phrases are not reported, nor bare generic words: ``crack``, ``scratch``, ``hole`` or
``contamination`` are the ordinary defect vocabulary of every generic prompt (WinCLIP's states, FiLo's detector
words), not a copy of a label list.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

_SPELLINGS = {"colour": "color", "coloured": "colored", "colours": "colors", "grey": "gray", "greyish": "grayish"}
_NOT_DEFECTS = frozenset({"good", "anomaly", "normal", "other"})

GENERIC_DEFECT_WORDS = frozenset(
    {
        "anomaly",
        "defect",
        "damage",
        "damaged",
        "broken",
        "contamination",
        "crack",
        "cracks",
        "scratch",
        "scratches",
        "hole",
        "holes",
        "dent",
        "stain",
        "missing",
        "bent",
        "cut",
        "burnt",
        "chip",
        "rust",
        "corrosion",
        "deformation",
        "discoloration",
    }
)
"""The generic defect vocabulary (vlad's generic phrases, WinCLIP's states, FiLo's detector words): a bare one of
these in a prompt is not a copied label, even where a benchmark uses it as a defect name."""


def normalize_text(text: str) -> str:
    """``"Gray_Stroke"`` -> ``"gray stroke"``, ``"different colour spot"`` -> ``"different color spot"``."""
    words = re.sub(r"[^a-z0-9 ]+", " ", re.sub(r"[_\-]+", " ", str(text).lower())).split()
    return " ".join(_SPELLINGS.get(w, w) for w in words)


def defect_names(samples: Iterable[Any]) -> dict[str, list[str]]:
    """Category -> sorted normalised defect names of its anomalous samples (``good`` and VisA's plain ``anomaly``
    are not names; a VisA sample with several labels holds them comma-separated)."""
    names: dict[str, set[str]] = defaultdict(set)
    for sample in samples:
        if not getattr(sample, "label", 0):
            continue
        for part in str(sample.defect).split(","):
            name = normalize_text(part)
            if name and name not in _NOT_DEFECTS:
                names[sample.category].add(name)
    return {category: sorted(found) for category, found in names.items()}


def shared_names(phrases: Sequence[str], names: Sequence[str]) -> list[str]:
    """The defect names (normalised, sorted) that the phrases share, by the rule in the module docstring."""
    texts = [normalize_text(p.replace("{}", " ")) for p in phrases]
    padded = [f" {t} " for t in texts]
    out = set()
    for raw in names:
        name = normalize_text(raw)
        if not name:
            continue
        if " " in name:
            shared = any(f" {name} " in t for t in padded)
        else:
            shared = name not in GENERIC_DEFECT_WORDS and name in texts
        if shared:
            out.add(name)
    return sorted(out)


def prompt_overlap_warnings(scorer: Any, samples: Iterable[Any]) -> list[str]:
    """One warning per category whose defect names the scorer's prompt phrases share.

    Args:
        scorer: anything with ``prompt_phrases(object_name) -> list[str]`` (every :class:`~vlad.scorers.base.Scorer`).
        samples: the evaluated :class:`~vlad.data.datasets.Sample` records.

    Returns:
        ``"prompts share phrases with <category>'s defect names: a, b"`` per affected category, in category order.
    """
    from vlad.data.datasets import prompt_name

    phrases_of = getattr(scorer, "prompt_phrases", None)
    if phrases_of is None:
        return []
    out = []
    for category, names in sorted(defect_names(samples).items()):
        shared = shared_names(phrases_of(prompt_name(category)), names)
        if shared:
            out.append(f"prompts share phrases with {category}'s defect names: {', '.join(shared)}")
    return out
