"""Fine-grained defect phrases per kind of object (``prompts/filo.yaml``), shared by the FiLo scorer and the explainer.

An object name (a product, or a dataset class spelled as its folder: ``metal_nut``, ``pcb3``, ``chewinggum``) is
normalised and looked up in the kinds' ``objects`` lists; names that match no kind get the ``generic`` list, and
:func:`resolve_kind` says so (None). Only PyYAML is needed here (no torch).

Lookup order, first hit wins: the normalised name (lower case, ``_`` and ``-`` as spaces, a trailing number dropped);
the same without spaces (``chewinggum`` = ``chewing gum``); without a plural ``s`` (``capsules``); then its last word
(``gearbox housing`` -> ``housing``) and that without a plural ``s``.

A bank may also hold the older per-class form ``classes: {name: [phrases]}`` (hand-written banks, tests); its
entries are looked up the same way, before the kinds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

GENERIC = "generic"


def normalize_object_name(name: str) -> str:
    """``"Metal_Nut"`` -> ``"metal nut"``, ``"pcb3"`` -> ``"pcb"``, ``"macaroni 2"`` -> ``"macaroni"``."""
    text = re.sub(r"[_\-\s]+", " ", str(name).strip().lower()).strip()
    return re.sub(r"\s*\d+$", "", text).strip() or text


def _candidates(name: str) -> list[str]:
    key = normalize_object_name(name)
    out = [key, key.replace(" ", "")]
    if key.endswith("s") and len(key) > 3:
        out.append(key[:-1])
    last = key.rsplit(" ", 1)[-1]
    if last != key:
        out.append(last)
        if last.endswith("s") and len(last) > 3:
            out.append(last[:-1])
    return out


def _index(names: Sequence[str]) -> dict[str, str]:
    """Lookup keys (normalised, and without spaces) -> the name as written in the bank."""
    index: dict[str, str] = {}
    for name in names:
        key = normalize_object_name(name)
        index.setdefault(key, name)
        index.setdefault(key.replace(" ", ""), name)
    return index


def resolve_kind(bank: dict[str, Any], object_name: str) -> str | None:
    """The bank entry an object name resolves to: a legacy ``classes`` key or a ``kinds`` key; None means generic."""
    legacy = _index(list(bank.get("classes") or {}))
    objects = {obj: kind for kind, entry in (bank.get("kinds") or {}).items() for obj in entry.get("objects") or []}
    kinds = _index(list(objects))
    for candidate in _candidates(object_name):
        if candidate in legacy:
            return legacy[candidate]
        if candidate in kinds:
            return objects[kinds[candidate]]
    return None


def visual_phrases(phrases: Sequence[str], non_visual: Sequence[str]) -> list[str]:
    """Drop phrases naming what a camera cannot see (case-insensitive substring match on ``non_visual``)."""
    words = [w.lower() for w in non_visual]
    return [p for p in phrases if not any(w in p.lower() for w in words)]


def kind_phrases(bank: dict[str, Any], object_name: str) -> tuple[list[str], str]:
    """(the visual defect phrases for an object, the entry they come from: a kind, a legacy class, or ``generic``)."""
    entry = resolve_kind(bank, object_name)
    if entry is None:
        phrases, source = list(bank.get(GENERIC) or []), GENERIC
    elif entry in (bank.get("classes") or {}):
        phrases, source = list(bank["classes"][entry]), entry
    else:
        phrases, source = list(bank["kinds"][entry].get("phrases") or []), entry
    return visual_phrases(phrases, bank.get("non_visual_words") or []), source


def object_names(bank: dict[str, Any]) -> list[str]:
    """Every object name the bank knows (kinds' objects and legacy classes), sorted."""
    names = set(bank.get("classes") or {})
    for entry in (bank.get("kinds") or {}).values():
        names.update(entry.get("objects") or [])
    return sorted(names)


def generic_note(object_name: str) -> str:
    """The warning for an object name that resolves to no kind."""
    return (
        f"no defect phrases for {object_name!r} in prompts/filo.yaml (no kind lists it): "
        "the generic defect list is used"
    )
