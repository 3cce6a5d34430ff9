"""The rule model: typed natural-language anomaly rules, a verdict policy and product profiles (pydantic v2).

Every model rejects unknown keys (``extra="forbid"``), so a misspelt key in a YAML rule file is an error, not a rule
silently ignored. Every rule keeps ``text``: the words the user wrote, quoted back in rule hits and reports.

Example (YAML):

.. code-block:: yaml

    rules:
      - {kind: acceptable, concept: scratches, where: {object: label}, text: scratches on the label are fine}
      - {kind: defect, concept: bent pin, severity: critical}
      - {kind: ignore_concept, concept: colour}
      - {kind: defect, concept: holes, severity: critical, min_size: 2, unit: percent_image}
      - {kind: min_size, value: 1, unit: percent_object, concept: dents}
      - {kind: region, mode: only, positions: [top half]}
      - {kind: border, width: 10, unit: pixels}
      - {kind: required_object, object: screw, min_count: 2}
    policy: {fail_at: major}
    px_per_mm: 12

Only pydantic, PyYAML and the LAFT vocabulary (torch-free) are needed here.
"""

from __future__ import annotations

import json
import logging
import math
import re
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlad.errors import ConfigError

logger = logging.getLogger(__name__)

Severity = Literal["minor", "major", "critical"]
SEVERITIES: tuple[str, ...] = ("minor", "major", "critical")
SIZE_UNITS: tuple[str, ...] = ("percent_image", "percent_object", "pixels", "mm", "mm2")
SizeUnit = Literal["percent_image", "percent_object", "pixels", "mm", "mm2"]
BORDER_UNITS: tuple[str, ...] = ("percent_side", "pixels", "mm")
DEFAULT_BORDER_PERCENT = 5.0
"""The band "ignore the edges" means: 5 % of the image's shorter side (25 px of a 512 px photo)."""
MM_UNITS: tuple[str, ...] = ("mm", "mm2")
RULE_FILE_SUFFIXES: tuple[str, ...] = (".yaml", ".yml", ".json")
_SPELLING = ((r"\bcolor", "colour"), (r"\bgray", "grey"), (r"\bcentre\b", "center"))


def severity_rank(severity: str) -> int:
    """0 for minor, 1 for major, 2 for critical."""
    return SEVERITIES.index(severity)


@cache
def rule_tables() -> dict[str, Any]:
    """The parsed ``prompts/rules.yaml`` (phrase tables and area boxes); cached, treat as read-only."""
    from vlad.resources import load_prompt_file

    return load_prompt_file("rules")


def area_names() -> tuple[str, ...]:
    """Canonical area names: the 3x3 position words, halves, rows and columns."""
    return tuple(rule_tables()["areas"])


def area_box(name: str) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` fractions of the image for a canonical area name."""
    x0, y0, x1, y1 = (float(v) for v in rule_tables()["areas"][name])
    return x0, y0, x1, y1


def canonical_area(words: str) -> str | None:
    """A canonical area name for user words ("upper-left", "Top Left", "lower half"), or None."""
    key = " ".join(words.lower().replace("centre", "center").split())
    if key in rule_tables()["areas"]:
        return key
    synonyms = rule_tables()["area_synonyms"]
    return synonyms.get(key) or synonyms.get(key.replace("-", " "))


@cache
def laft_aliases() -> dict[str, str]:
    """Normalised alias (and name) -> canonical LAFT concept name, from ``prompts/laft.yaml``."""
    from vlad.laft import load_vocabulary

    out: dict[str, str] = {}
    for concept in load_vocabulary().values():
        for alias in (concept.name.replace("_", " "), *concept.aliases):
            out[normalise_words(alias)] = concept.name
    return out


def normalise_words(text: str) -> str:
    """Lower case, British spelling of colour/grey, US ``center``, single spaces."""
    text = text.lower().replace("’", "'").replace("_", " ")
    for pattern, replacement in _SPELLING:
        text = re.sub(pattern, replacement, text)
    return " ".join(text.split())


def laft_concept(word: str) -> str | None:
    """The canonical LAFT concept a word or alias names ("color" -> "colour"), or None."""
    return laft_aliases().get(normalise_words(word))


# ---------------------------------------------------------------------------------------------------- models
def _check_area(value: str) -> str:
    name = canonical_area(value)
    if name is None:
        raise ValueError(f"unknown position {value!r}; allowed: {', '.join(area_names())}")
    return name


def _check_phrase(value: str) -> str:
    text = " ".join(str(value).replace("{", " ").replace("}", " ").split())
    if not text:
        raise ValueError("must name something (got an empty text)")
    if len(text) > 120:
        raise ValueError(f"is longer than 120 characters: {text[:40]!r}...")
    return text


def _check_laft_concept(value: str) -> str:
    name = laft_concept(value)
    if name is None:
        known = ", ".join(sorted(set(laft_aliases().values())))
        raise ValueError(f"{value!r} is not a LAFT concept; known concepts: {known}")
    return name


def check_size(value: float, unit: str) -> None:
    """Raises ValueError unless ``value`` is a sensible size in ``unit`` (a size unit or a border unit)."""
    if not math.isfinite(value):
        raise ValueError(f"size {value} is not a finite number")
    if unit in ("pixels", *MM_UNITS):
        if value <= 0:
            name = {"pixels": "pixels", "mm": "mm", "mm2": "mm²"}[unit]
            what = "a pixel count" if unit == "pixels" else "a length" if unit == "mm" else "an area"
            raise ValueError(f"size {value:g} {name} is out of range; use {what} above 0")
    elif not 0 < value <= 100:
        raise ValueError(f"size {value:g} % is out of range; use a percentage above 0 and at most 100")


def check_px_per_mm(value: float | None) -> float | None:
    """Raises ValueError unless ``value`` is None or a finite scale above 0 (pixels per millimetre)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"px_per_mm (pixels per millimetre) must be above 0, got {value:g}")
    return value


def size_text(value: float, unit: str) -> str:
    """``2% of the image``, ``50 pixels``, ``5 mm (longest side)``, ``3 mm²``."""
    units = {
        "percent_image": "% of the image",
        "percent_object": "% of the part",
        "pixels": " pixels",
        "mm": " mm (longest side)",
        "mm2": " mm²",
    }
    return f"{value:g}{units[unit]}"


def check_box(value: list[float]) -> list[float]:
    """Validates ``[x0, y0, x1, y1]`` image fractions; raises ValueError naming the box."""
    box = [float(v) for v in value]
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"box must be four numbers [x0, y0, x1, y1] (fractions of the image), got {value}")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"box {value} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the image)")
    return box


Phrase = Annotated[str, AfterValidator(_check_phrase)]
AreaName = Annotated[str, AfterValidator(_check_area)]
LaftName = Annotated[str, AfterValidator(_check_laft_concept)]
FractionBox = Annotated[list[float], AfterValidator(check_box)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Area(_Model):
    """Where on the image: canonical area names, a box of image fractions, and/or a named part of the product.

    Attributes:
        positions: canonical area names (see :func:`area_names`); synonyms are normalised ("upper half" ->
            "top half", "upper-left" -> "top left").
        box: ``[x0, y0, x1, y1]`` as fractions of the width / height, ``0 <= x0 < x1 <= 1``, ``0 <= y0 < y1 <= 1``.
        object: a part of the product the zero-shot detector can find ("label"); only for acceptable rules.
    """

    positions: list[AreaName] = Field(default_factory=list)
    box: FractionBox | None = None
    object: Phrase | None = None

    def boxes(self) -> list[tuple[float, float, float, float]]:
        """Every area as ``(x0, y0, x1, y1)`` fractions (positions first, then the box)."""
        out = [area_box(p) for p in self.positions]
        if self.box is not None:
            out.append((self.box[0], self.box[1], self.box[2], self.box[3]))
        return out

    def describe(self) -> str:
        """Where, with its preposition: "in the top left or on the label"."""
        parts = [f"in the {p}" for p in self.positions]
        if self.box is not None:
            parts.append("in the box [" + ", ".join(f"{v:g}" for v in self.box) + "]")
        if self.object:
            parts.append(f"on the {self.object}")
        return " or ".join(parts) if parts else "anywhere"


class _Rule(_Model):
    """Fields every rule has."""

    kind: str
    text: str = Field("", description="the user's words for this rule, quoted back in reports")

    @property
    def label(self) -> str:
        """The user's words, or a description when the rule was written as YAML without ``text``."""
        return self.text or self.describe()

    def describe(self) -> str:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError


class DefectRule(_Rule):
    """A kind of defect that makes a region anomalous, with a severity ("a bent pin is critical"), optionally only from
    a size on ("holes bigger than 2 % of the image are critical").

    Attributes:
        concept: the kind of defect; None only with ``min_size`` ("anything larger than 5 % is critical": every
            region of that size, whatever it looks like).
        severity: what a region it names is.
        min_size: None: any size; else the rule names only regions at least this large, in ``unit``.
        unit: the unit of ``min_size`` (see :class:`MinSizeRule`; ``percent_image`` when not given); None without
            ``min_size``.
    """

    kind: Literal["defect"] = "defect"
    concept: Phrase | None = None
    severity: Severity = "major"
    min_size: float | None = None
    unit: SizeUnit | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_unit(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("min_size") is not None and data.get("unit") is None:
            return {**data, "unit": "percent_image"}
        return data

    @model_validator(mode="after")
    def _names_something(self) -> DefectRule:
        if self.min_size is not None:
            check_size(self.min_size, self.unit or "percent_image")
        elif self.unit is not None:
            raise ValueError(f"unit {self.unit!r} needs a min_size (the size from which the rule names a region)")
        elif self.concept is None:
            raise ValueError("a defect rule needs a concept, or a min_size for regions of any kind")
        return self

    def describe(self) -> str:
        if self.min_size is None:
            return f'"{self.concept}" is a {self.severity} defect'
        what = f'"{self.concept}" regions' if self.concept else "regions"
        size = size_text(self.min_size, self.unit or "percent_image")
        return f"{what} of at least {size} are a {self.severity} defect"


class AcceptableRule(_Rule):
    """A kind of finding that is not a defect, optionally only somewhere ("scratches on the label are fine")."""

    kind: Literal["acceptable"] = "acceptable"
    concept: Phrase
    where: Area | None = None

    def describe(self) -> str:
        where = f" {self.where.describe()}" if self.where is not None else ""
        return f'"{self.concept}" is acceptable{where}'


class IgnoreConceptRule(_Rule):
    """A LAFT nuisance to project out of the image features ("ignore colour")."""

    kind: Literal["ignore_concept"] = "ignore_concept"
    concept: LaftName

    def describe(self) -> str:
        return f"ignore {self.concept.replace('_', ' ')} (LAFT: features projected off its subspace)"


class FocusConceptRule(_Rule):
    """A LAFT concept to keep only ("focus on cracks")."""

    kind: Literal["focus_concept"] = "focus_concept"
    concept: LaftName

    def describe(self) -> str:
        return f"focus on {self.concept.replace('_', ' ')} (LAFT: features projected onto its subspace)"


class MinSizeRule(_Rule):
    """Regions smaller than ``value`` are ignored (only those that look like ``concept``, when given).

    Attributes:
        value: the size limit; a percentage in (0, 100] for ``percent_*`` units, a number > 0 for the others.
        unit: ``percent_image`` (of the image), ``percent_object`` (of the detected product's box), ``pixels`` (the
            region's pixel count), ``mm`` (the longer side of its box in millimetres) or ``mm2`` (its area in square
            millimetres); the millimetre units need the rule set's ``px_per_mm``.
        concept: None: any region, whatever it looks like; else only regions that look like it ("dents smaller than
            1 % are fine").
    """

    kind: Literal["min_size"] = "min_size"
    value: float
    unit: SizeUnit = "percent_image"
    concept: Phrase | None = None

    @model_validator(mode="after")
    def _in_range(self) -> MinSizeRule:
        check_size(self.value, self.unit)
        return self

    def describe(self) -> str:
        what = f'"{self.concept}" regions' if self.concept else "regions"
        return f"{what} smaller than {size_text(self.value, self.unit)} are ignored"


class RegionRule(_Rule):
    """Regions of interest (``only``) or regions to ignore (``ignore``), by area name or box; a region is inside when
    its centroid is."""

    kind: Literal["region"] = "region"
    mode: Literal["only", "ignore"]
    positions: list[AreaName] = Field(default_factory=list)
    box: FractionBox | None = None

    @model_validator(mode="after")
    def _names_an_area(self) -> RegionRule:
        if not self.positions and self.box is None:
            raise ValueError(f"a region rule needs positions or a box; positions are: {', '.join(area_names())}")
        return self

    @property
    def area(self) -> Area:
        return Area(positions=self.positions, box=self.box)

    def describe(self) -> str:
        if self.mode == "only":
            return f"only regions {self.area.describe()} count"
        return f"regions {self.area.describe()} are ignored"


class BorderRule(_Rule):
    """Regions lying in a band along the image border are ignored ("ignore anything within 10 pixels of the border",
    "ignore the edges").

    A region lies in the band when its whole box does, along one side (``x1 <= band``, ``y1 <= band``,
    ``x0 >= W - band`` or ``y0 >= H - band``); a region that reaches further into the image is kept.

    Attributes:
        width: the band's width in ``unit``; "the edges" without a number is :data:`DEFAULT_BORDER_PERCENT`.
        unit: ``percent_side`` (of the image's shorter side), ``pixels`` or ``mm`` (needs ``px_per_mm``).
    """

    kind: Literal["border"] = "border"
    width: float = DEFAULT_BORDER_PERCENT
    unit: Literal["percent_side", "pixels", "mm"] = "percent_side"

    @model_validator(mode="after")
    def _in_range(self) -> BorderRule:
        check_size(self.width, self.unit)
        return self

    def describe(self) -> str:
        if self.unit == "percent_side":
            width = f"a band of {self.width:g}% of the image's shorter side along"
        else:
            width = f"{self.width:g} {'pixels' if self.unit == 'pixels' else 'mm'} of"
        return f"regions lying within {width} the image border are ignored"


class RequiredObjectRule(_Rule):
    """An object the zero-shot detector must find at least ``min_count`` times, else the part fails."""

    kind: Literal["required_object"] = "required_object"
    object: Phrase
    min_count: int = Field(1, ge=1)

    def describe(self) -> str:
        return f'at least {self.min_count} x "{self.object}" must be present (checked with the object detector)'


Rule = Annotated[
    DefectRule
    | AcceptableRule
    | IgnoreConceptRule
    | FocusConceptRule
    | MinSizeRule
    | RegionRule
    | BorderRule
    | RequiredObjectRule,
    Field(discriminator="kind"),
]
RULE_KINDS: tuple[str, ...] = (
    "defect",
    "acceptable",
    "ignore_concept",
    "focus_concept",
    "min_size",
    "region",
    "border",
    "required_object",
)


def in_mm(rule: Any) -> bool:
    """True for a rule measured in millimetres (it needs ``px_per_mm``)."""
    return getattr(rule, "unit", None) in MM_UNITS


class VerdictPolicy(_Model):
    """Which severity makes a part fail.

    Attributes:
        fail_at: the part fails when a remaining region's severity is at least this.
        default_severity: the severity of a region no defect rule names.
        text: the user's words ("fail only on major defects"); empty for the default policy.
    """

    fail_at: Severity = "minor"
    default_severity: Severity = "major"
    text: str = ""

    @property
    def label(self) -> str:
        return self.text or self.describe()

    def describe(self) -> str:
        return f"the part fails on {self.fail_at} defects or worse (unnamed findings count as {self.default_severity})"


class RuleSet(_Model):
    """The rules of one product, in the order the user wrote them, the verdict policy, and the camera's scale.

    Attributes:
        rules: the rules.
        policy: which severity fails a part.
        px_per_mm: pixels of the photo per millimetre on the part (a product setting: camera and lens); rules in
            ``mm`` / ``mm2`` need it and are ``not applicable`` without it.
        px_per_mm_text: the user's words that set ``px_per_mm`` ("12 pixels per mm"); empty when set in a file.
    """

    rules: list[Rule] = Field(default_factory=list)
    policy: VerdictPolicy = Field(default_factory=VerdictPolicy)
    px_per_mm: float | None = None
    px_per_mm_text: str = ""

    @field_validator("px_per_mm")
    @classmethod
    def _positive_scale(cls, value: float | None) -> float | None:
        return check_px_per_mm(value)

    def of_kind(self, *classes: type[_Rule]) -> list[Any]:
        """The rules that are instances of ``classes``, in order."""
        return [r for r in self.rules if isinstance(r, classes)]

    @property
    def is_empty(self) -> bool:
        """True when there are no rules, the policy is the default one and no camera scale is set."""
        return not self.rules and self.policy == VerdictPolicy() and self.px_per_mm is None

    @property
    def shows_policy(self) -> bool:
        """Whether the policy is worth saying back: the user wrote it, or it is not the default one."""
        return bool(self.policy.text) or self.policy.model_copy(update={"text": ""}) != VerdictPolicy()

    def describe_scale(self) -> str:
        """``the photos have 12 pixels per millimetre (for rules in mm)``."""
        return f"the photos have {self.px_per_mm:g} pixels per millimetre (for rules in mm)"

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_defaults=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_data(cls, data: Any, *, where: str = "rules") -> RuleSet:
        """Validates a mapping (or a bare list of rules); bad data raises :class:`ConfigError` naming ``where``."""
        if isinstance(data, list):
            data = {"rules": data}
        return _validate(cls, data, where)

    @classmethod
    def from_text(cls, text: str, *, where: str = "rules") -> RuleSet:
        """Parses YAML or JSON text (JSON is YAML)."""
        return cls.from_data(_load_yaml(text, where), where=where)


class ProductProfile(_Model):
    """A product's inspection setup, saved as YAML or JSON.

    Attributes:
        product: the product name used in prompts ("bottle").
        rules: its rules.
        references: normal reference images; relative paths are relative to the profile file (see
            :meth:`reference_paths`).
        threshold: a raw-score threshold, or None for the scorer's default / calibrated one.
        scorer: registry name of the scorer.
        backbone: backbone spec, or None for the scorer's default.
        px_per_mm: pixels of the photo per millimetre on the part, for rules in millimetres; passed on to the rules
            (:meth:`product_rules`). Giving it here and a different one in ``rules`` is an error.
    """

    product: Phrase
    rules: RuleSet = Field(default_factory=RuleSet)
    references: list[str] = Field(default_factory=list)
    threshold: float | None = None
    scorer: str = "winclip"
    backbone: str | None = None
    px_per_mm: float | None = None

    @field_validator("px_per_mm")
    @classmethod
    def _positive_scale(cls, value: float | None) -> float | None:
        return check_px_per_mm(value)

    @model_validator(mode="after")
    def _one_scale(self) -> ProductProfile:
        if None not in (self.px_per_mm, self.rules.px_per_mm) and self.px_per_mm != self.rules.px_per_mm:
            raise ValueError(
                f"px_per_mm is {self.px_per_mm:g} for the product but {self.rules.px_per_mm:g} in its rules; give one"
            )
        return self

    def product_rules(self) -> RuleSet:
        """The rules with the product's ``px_per_mm`` (the rules' own when the product gives none)."""
        if self.px_per_mm is None or self.rules.px_per_mm is not None:
            return self.rules
        return self.rules.model_copy(update={"px_per_mm": self.px_per_mm})

    @field_validator("threshold")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"threshold must be a finite number, got {value}")
        return value

    def reference_paths(self, base: str | Path) -> list[Path]:
        """References as paths, relative ones resolved against ``base`` (the profile file's folder)."""
        root = Path(base)
        return [p if p.is_absolute() else root / p for p in (Path(r).expanduser() for r in self.references)]


# ---------------------------------------------------------------------------------------------------- files
def save_rules(rules: RuleSet, path: str | Path) -> Path:
    """Writes a rule set as JSON (``.json``) or YAML (``.yaml`` / ``.yml``)."""
    return _write(path, rules.model_dump(mode="json"))


def load_rules(path: str | Path) -> RuleSet:
    """Reads a rule set (or a product profile's rules) from a ``.yaml`` / ``.yml`` / ``.json`` file.

    Raises:
        ConfigError: a missing or unreadable file, another suffix, or invalid rules (the message names the file).
    """
    data = _read(path)
    if isinstance(data, dict) and "product" in data:
        return _validate(ProductProfile, data, str(path)).product_rules()
    return RuleSet.from_data(data, where=str(path))


def save_profile(profile: ProductProfile, path: str | Path) -> Path:
    """Writes a product profile as JSON (``.json``) or YAML (``.yaml`` / ``.yml``), creating parent folders."""
    return _write(path, profile.model_dump(mode="json"))


def load_profile(path: str | Path) -> ProductProfile:
    """Reads a product profile written by :func:`save_profile` (or by hand).

    Raises:
        ConfigError: a missing or unreadable file, another suffix, or an invalid profile (the message names the file
            and the offending key).
    """
    return _validate(ProductProfile, _read(path), str(path))


def _write(path: str | Path, data: dict[str, Any]) -> Path:
    out = Path(path)
    suffix = _check_suffix(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        out.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


def read_rules_text(file: Path) -> str:
    """The text of a rules file; a missing or unreadable file is a one-line ConfigError."""
    if not file.is_file():
        raise ConfigError(f"rules file {file} does not exist")
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read rules file {file}: {exc}") from exc


def _read(path: str | Path) -> Any:
    file = Path(path)
    _check_suffix(file)
    return _load_yaml(read_rules_text(file), str(file))


def _load_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())[:200]
        raise ConfigError(f"{where} is not valid YAML/JSON: {first}") from exc


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in RULE_FILE_SUFFIXES:
        raise ConfigError(f"rules file {path} must end in {', '.join(RULE_FILE_SUFFIXES)}, got {suffix or 'nothing'!r}")
    return suffix


def _validate(model: type[BaseModel], data: Any, where: str) -> Any:
    if data is None:
        raise ConfigError(f"{where} is empty; write at least one rule (see docs/rules.md)")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {validation_message(exc)}") from exc


def validation_message(exc: ValidationError) -> str:
    """One line for a pydantic error: the first problem, where it is, and how many more there are."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if not _is_union_tag(p)) or "(top level)"
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "unknown key (not allowed)"
    elif first.get("type") == "union_tag_invalid":
        message = f"unknown rule kind; allowed kinds: {', '.join(RULE_KINDS)}"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{loc}: {message}{more}"


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and part in RULE_KINDS
