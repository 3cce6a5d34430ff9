"""The shipped FiLo phrase bank (prompts/filo.yaml) holds no benchmark test labels, and class names resolve to kinds.

MVTec AD's test folder names and VisA's image_anno.csv labels are test labels: prompts that repeat them tune a
zero-shot method to the test set (and the explainer would name a region with the ground-truth label). The rules,
on normalised text (lower case, "_" as space, "colour" as "color", "grey" as "gray"):

1. No phrase contains, as whole words, a multi-word defect name of either dataset (every folder name written with
   "_" is one: glue_strip, gray_stroke, manipulated_front, pill_type, cable_swap, faulty_imprint, ...), and no phrase
   is a bare one-word name ("poke"; "a crack" is fine, and so is the bare generic vocabulary below, as in FiLo's
   detector words "broken", "damage", "contamination").
2. No phrase uses a one-word label that is labelling shorthand rather than a description (combined, defective,
   misplaced, flip, poke, squeeze, print, misshape, discolor, extra, melt).
3. No class's phrase list is a near-copy of its defect list: at most a third of a class's defect names appear in the
   phrases of the kind it resolves to. A name appears when every one of its words starts a word of one phrase
   ("crack" matches "cracked"). Exempt: the generic defect vocabulary that every zero-shot method uses
   (``vlad.data.defects.GENERIC_DEFECT_WORDS``: vlad's own generic list, WinCLIP's states, FiLo's detector words --
   crack, scratch, hole, dent, stain, contamination, missing, bent, broken, cut, burnt, damage, chip, rust, ...).
"""

from __future__ import annotations

import re

import pytest

from vlad.data.defects import GENERIC_DEFECT_WORDS, normalize_text, shared_names
from vlad.finegrained import GENERIC, kind_phrases, normalize_object_name, resolve_kind
from vlad.resources import load_prompt_file

MVTEC_AD = {
    "bottle": ["broken_large", "broken_small", "contamination"],
    "cable": [
        "bent_wire",
        "cable_swap",
        "combined",
        "cut_inner_insulation",
        "cut_outer_insulation",
        "missing_cable",
        "missing_wire",
        "poke_insulation",
    ],
    "capsule": ["crack", "faulty_imprint", "poke", "scratch", "squeeze"],
    "carpet": ["color", "cut", "hole", "metal_contamination", "thread"],
    "grid": ["bent", "broken", "glue", "metal_contamination", "thread"],
    "hazelnut": ["crack", "cut", "hole", "print"],
    "leather": ["color", "cut", "fold", "glue", "poke"],
    "metal_nut": ["bent", "color", "flip", "scratch"],
    "pill": ["color", "combined", "contamination", "crack", "faulty_imprint", "pill_type", "scratch"],
    "screw": ["manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"],
    "tile": ["crack", "glue_strip", "gray_stroke", "oil", "rough"],
    "toothbrush": ["defective"],
    "transistor": ["bent_lead", "cut_lead", "damaged_case", "misplaced"],
    "wood": ["color", "combined", "hole", "liquid", "scratch"],
    "zipper": [
        "broken_teeth",
        "combined",
        "fabric_border",
        "fabric_interior",
        "rough",
        "split_teeth",
        "squeezed_teeth",
    ],
}
"""MVTec AD test folder names (Bergmann et al., CVPR 2019), "good" left out."""

_PCB_1_3 = ["bent", "melt", "missing", "scratch"]
_MACARONI = [
    "broken",
    "chip around edge and corner",
    "different colour spot",
    "middle breakage",
    "similar colour spot",
    "small chip around edge",
    "small cracks",
    "small scratches",
    "breakage down the middle",
    "color spot similar to the object",
    "different color spot",
]
VISA = {
    "candle": [
        "chunk of wax missing",
        "damaged corner of packaging",
        "different colour spot",
        "extra wax in candle",
        "foreign particals on candle",
        "wax melded out of the candle",
        "weird candle wick",
    ],
    "capsules": ["bubble", "discolor", "leak", "misshape", "scratch"],
    "cashew": [
        "burnt",
        "corner or edge breakage",
        "different colour spot",
        "middle breakage",
        "same colour spot",
        "small holes",
        "small scratches",
        "stuck together",
    ],
    "chewinggum": ["chunk of gum missing", "corner missing", "scratches", "similar colour spot", "small cracks"],
    "fryum": [
        "burnt",
        "corner or edge breakage",
        "different colour spot",
        "fryum stuck together",
        "middle breakage",
        "similar colour spot",
        "small scratches",
    ],
    "macaroni1": _MACARONI,
    "macaroni2": _MACARONI,
    "pcb1": _PCB_1_3,
    "pcb2": _PCB_1_3,
    "pcb3": _PCB_1_3,
    "pcb4": ["burnt", "damage", "dirt", "extra", "missing", "scratch", "wrong place"],
    "pipe_fryum": [
        "burnt",
        "corner and edge breakage",
        "different colour spot",
        "middle breakage",
        "similar colour spot",
        "small scratches",
        "stuck together",
    ],
}
"""VisA defect labels (Zou et al., ECCV 2022; the per-class image_anno.csv, "normal" and "other" left out), as
written there, plus the macaroni variants of both halves."""

DATASETS = {**MVTEC_AD, **VISA}
SHORTHAND = {
    "combined",
    "defective",
    "misplaced",
    "flip",
    "poke",
    "squeeze",
    "print",
    "misshape",
    "discolor",
    "extra",
    "melt",
}
UNIVERSAL = GENERIC_DEFECT_WORDS


@pytest.fixture(scope="module")
def bank():
    return load_prompt_file("filo")


def all_phrases(bank) -> list[str]:
    out = list(bank["generic"]) + list(bank["detector_words"]) + list(bank["generic_states"])
    for entry in bank["kinds"].values():
        out += entry["phrases"]
    return out


def _words(text: str) -> list[str]:
    return normalize_text(text).split()


def appears(name: str, phrases: list[str]) -> bool:
    """Every word of the name starts a word of one phrase."""
    wanted = _words(name)
    return any(all(any(w.startswith(n) for w in _words(p)) for n in wanted) for p in phrases)


def test_the_name_lists_are_complete():
    assert len(MVTEC_AD) == 15
    assert sum(map(len, MVTEC_AD.values())) == 73
    assert len(VISA) == 12


def test_bank_has_kinds_not_per_class_lists(bank):
    assert "classes" not in bank  # per-class lists invite copying the benchmark's label list
    seen: dict[str, str] = {}
    for kind, entry in bank["kinds"].items():
        assert len(entry["phrases"]) >= 8, kind
        for obj in entry["objects"]:
            key = normalize_object_name(obj)
            assert key not in seen, f"{obj!r} is in both {seen.get(key)!r} and {kind!r}"
            seen[key] = kind


def test_rule_1_no_multi_word_name_and_no_bare_label(bank):
    names = sorted({normalize_text(n) for names in DATASETS.values() for n in names})
    phrases = all_phrases(bank)
    assert shared_names(phrases, names) == []
    for phrase in phrases:  # the same, spelled out
        text = f" {normalize_text(phrase)} "
        for name in names:
            assert not (" " in name and f" {name} " in text), (phrase, name)
            assert normalize_text(phrase) != name or name in UNIVERSAL, phrase


def test_rule_2_no_labelling_shorthand(bank):
    for phrase in all_phrases(bank):
        assert not SHORTHAND & set(_words(phrase)), phrase


@pytest.mark.parametrize("category", sorted(DATASETS))
def test_rule_3_no_class_list_copies_its_defect_names(bank, category):
    phrases, kind = kind_phrases(bank, category)
    names = [normalize_text(n) for n in DATASETS[category]]
    hits = [n for n in names if n not in UNIVERSAL and appears(n, phrases)]
    assert 3 * len(hits) <= len(names), (category, kind, hits)


def test_rule_checks_catch_the_old_per_class_lists():
    """The rules reject the lists vlad shipped before (copies of MVTec's folder names)."""
    old = {
        "tile": ["a crack", "glue strip", "grey stroke", "an oil stain", "a rough patch", "a chipped corner"],
        "cable": ["a bent wire", "a cut outer insulation", "a missing wire", "a swapped wire colour"],
        "capsule": ["a crack in the shell", "a squeezed shape", "a faulty imprint", "a poked hole"],
    }
    assert shared_names(old["tile"], MVTEC_AD["tile"]) == ["glue strip", "gray stroke"]
    assert shared_names(old["cable"], MVTEC_AD["cable"]) == ["bent wire", "cut outer insulation", "missing wire"]
    hits = [n for n in MVTEC_AD["capsule"] if normalize_text(n) not in UNIVERSAL and appears(n, old["capsule"])]
    assert 3 * len(hits) > len(MVTEC_AD["capsule"])


@pytest.mark.parametrize("category", sorted(DATASETS))
def test_every_dataset_class_resolves_to_a_kind(bank, category):
    from vlad.data import prompt_name

    for spelling in {category, category.replace("_", " "), category.upper(), prompt_name(category)}:
        kind = resolve_kind(bank, spelling)
        assert kind not in (None, GENERIC), spelling
    assert kind_phrases(bank, category)[0] == bank["kinds"][resolve_kind(bank, category)]["phrases"]


def test_class_name_normalisation(bank):
    assert normalize_object_name("Metal_Nut") == "metal nut"
    assert normalize_object_name("pcb3") == normalize_object_name("PCB 3") == "pcb"
    assert normalize_object_name("macaroni_2") == "macaroni"
    assert resolve_kind(bank, "chewinggum") == resolve_kind(bank, "chewing gum") == "food"
    assert resolve_kind(bank, "metal nut") == resolve_kind(bank, "metalnut") == "fastener"
    assert resolve_kind(bank, "printed circuit board") == resolve_kind(bank, "pcb4") == "electronics"
    assert resolve_kind(bank, "capsules") == resolve_kind(bank, "capsule") == "pill"
    assert resolve_kind(bank, "gearbox housing") == "molded part"  # the head noun
    assert resolve_kind(bank, "flux widget") is None
    phrases, kind = kind_phrases(bank, "flux widget")
    assert kind == GENERIC
    assert phrases == bank["generic"]


def test_no_non_visual_phrase_is_shipped(bank):
    banned = [w.lower() for w in bank["non_visual_words"]]
    for phrase in all_phrases(bank):
        assert not any(re.search(rf"\b{re.escape(b)}\b", phrase.lower()) for b in banned), phrase


def test_explainer_phrases_follow_the_kind(bank):
    from vlad.explain.evidence import phrases_for

    fastener = bank["kinds"]["fastener"]["phrases"]
    assert phrases_for(bank, "metal_nut")[: len(fastener)] == fastener
    assert phrases_for(bank, "flux widget") == bank["generic"]
