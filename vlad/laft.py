"""LAFT: Language-Assisted Feature Transformation (Yun et al., ICLR 2025, arXiv 2503.01184; ``yuneg11/LAFT``).

A training-free linear map of image features, built from text. The prompts of a concept ("colour": "a red object",
"a blue object", ...) are encoded; the directions along which they vary span the concept's subspace ``B`` (k, D);
image features are then projected onto it (*guide*, "focus on cracks": ``x Bᵀ B``) or onto its orthogonal complement
(*ignore*, "ignore colour": ``x - x Bᵀ B``) before a kNN / memory-bank scorer compares them.

How the basis is computed (METHODS.md §3.7). LAFT runs an uncentred PCA of all n(n-1)/2 pairwise differences of the
prompt prototypes. Since ``Σ_{i<j} (t_i - t_j)(t_i - t_j)ᵀ = n Σ_i (t_i - t̄)(t_i - t̄)ᵀ`` and sign flips do not change
``d dᵀ``, that is the eigenbasis of the prototypes' covariance: vlad takes the right singular vectors of the centred
prototypes, O(n·D·min(n, D)) instead of materialising O(n²·D) differences (same subspace and the same variance
ratios; LAFT's randomised ``pca_lowrank`` is an approximation of it).

Deviations, on purpose:
- k is chosen per concept by explained variance (default 90 %) unless given; LAFT sweeps k by hand.
- several ignored (or guided) concepts are combined as the *union of their subspaces* (each concept keeps its own k),
  not as one PCA of all their prompts: a joint PCA would also remove the direction between the concepts' mean
  prompts (an artefact of their different wordings), and one concept with large variance could crowd out another.
- guide and ignore together ("ignore colour, focus on cracks"): the guide subspace minus its part inside the ignored
  subspace (``G' = orth((I - PᵢPᵢᵀ) G)``), then a guide projection onto ``G'``. Since ``G' ⟂ I`` this equals ignoring
  first and then guiding onto ``G'``, and it does not depend on the order of the clauses.
- LAFT's industrial prompt file (``industrial3``) copies the test sets' defect names; vlad ships its own generic
  vocabulary in ``prompts/laft.yaml``.

Text embeddings are **unnormalised** (LAFT's ``normalize=False``); the templates of one concept value are averaged into
one prototype (LAFT's list-of-lists prompt groups). The transforms are linear, so whether image features are
L2-normalised before them does not change their direction after them.

This module imports torch only inside functions: :func:`parse_concepts` and :func:`load_vocabulary` are torch-free.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from vlad.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from vlad.backbones.clip import ClipBackbone

logger = logging.getLogger(__name__)

MODES = ("guide", "ignore")
DEFAULT_EXPLAINED_VARIANCE = 0.9
_KINDS = ("nuisance", "defect")
_IGNORE_VERBS = (
    "ignore",
    "ignoring",
    "disregard",
    "disregarding",
    "don't care about",
    "dont care about",
    "do not care about",
    "regardless of",
    "invariant to",
    "be invariant to",
    "not sensitive to",
)
_GUIDE_VERBS = (
    "guide",
    "guide on",
    "guided by",
    "focus",
    "focus on",
    "focusing on",
    "focus only on",
    "only care about",
    "care about",
    "care only about",
    "attend to",
    "look for",
    "look at",
    "watch for",
    "concentrate on",
)
_STOPWORDS = frozenset(
    "and or but also then the a an any all its their of in on to for with about please just only variation variations "
    "variance change changes difference differences object objects image images photo photos".split()
)
_SPELLING = ((r"\bcolor", "colour"), (r"\bgray", "grey"), (r"\bcenter", "centre"), (r"\boxidiz", "oxidis"))
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?(?:-[a-z0-9]+)*")


# ---------------------------------------------------------------------------------------------------- vocabulary
@dataclass(frozen=True)
class Concept:
    """One concept of a LAFT vocabulary (``prompts/laft.yaml``).

    Attributes:
        name: canonical name, e.g. ``colour``.
        kind: ``nuisance`` or ``defect``.
        values: the concept's values, e.g. ``("red", "blue", ...)``; one prototype each.
        templates: prompt templates with ``{value}`` and ``{object}`` placeholders.
        aliases: words (possibly several tokens) users may type for it.
    """

    name: str
    kind: str
    values: tuple[str, ...]
    templates: tuple[str, ...]
    aliases: tuple[str, ...]

    def prompts(self, object_name: str = "object") -> list[list[str]]:
        """One list of prompts per value (every template), ``len(values) x len(templates)``."""
        return [[t.format(value=v, object=object_name) for t in self.templates] for v in self.values]


def load_vocabulary(name: str = "laft") -> dict[str, Concept]:
    """The concepts of ``prompts/<name>.yaml``, validated (torch-free).

    Raises:
        ConfigError: the file is missing or a concept is malformed (the message names it).
    """
    from vlad.resources import load_prompt_file

    data = load_prompt_file(name)
    concepts = data.get("concepts")
    if not isinstance(concepts, dict) or not concepts:
        raise ConfigError(f"prompts/{name}.yaml must hold a non-empty 'concepts' mapping")
    out = {key: _parse_concept(str(key), spec, name) for key, spec in concepts.items()}
    seen: dict[str, str] = {}
    for concept in out.values():
        for alias in (concept.name, *concept.aliases):
            if seen.setdefault(alias, concept.name) != concept.name:
                raise ConfigError(
                    f"prompts/{name}.yaml: alias {alias!r} names both {seen[alias]!r} and {concept.name!r}"
                )
    return out


def _parse_concept(key: str, spec: Any, file: str) -> Concept:
    where = f"prompts/{file}.yaml concept {key!r}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping with values, templates, aliases and kind")
    values = [str(v) for v in spec.get("values") or []]
    templates = [str(t) for t in spec.get("templates") or []]
    kind = str(spec.get("kind", "nuisance"))
    if len(values) < 2:
        raise ConfigError(f"{where} needs at least 2 values, got {len(values)}")
    if not templates:
        raise ConfigError(f"{where} needs at least one template")
    if kind not in _KINDS:
        raise ConfigError(f"{where} has kind {kind!r}; allowed: {', '.join(_KINDS)}")
    for template in templates:
        try:
            filled = template.format(value="\0", object="object")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"{where}: template {template!r} may only use {{value}} and {{object}}") from exc
        if "\0" not in filled:
            raise ConfigError(f"{where}: template {template!r} has no {{value}} placeholder")
    aliases = tuple(_normalise_text(str(a)) for a in spec.get("aliases") or [])
    return Concept(key, kind, tuple(values), tuple(templates), aliases)


# ---------------------------------------------------------------------------------------------------- parsing
def _normalise_text(text: str) -> str:
    text = text.lower().replace("’", "'").replace("_", " ")
    for pattern, replacement in _SPELLING:
        text = re.sub(pattern, replacement, text)
    return " ".join(_TOKEN.findall(text))


def _phrase_table(vocabulary: dict[str, Concept]) -> dict[tuple[str, ...], tuple[str, str]]:
    """Token tuple -> ("verb", mode) or ("concept", name)."""
    table: dict[tuple[str, ...], tuple[str, str]] = {}
    for concept in vocabulary.values():
        for alias in (_normalise_text(concept.name), *concept.aliases):
            table[tuple(alias.split())] = ("concept", concept.name)
    for mode, verbs in (("ignore", _IGNORE_VERBS), ("guide", _GUIDE_VERBS)):
        for verb in verbs:
            table[tuple(_normalise_text(verb).split())] = ("verb", mode)
    return table


def parse_concepts(text: str | None, vocabulary: str = "laft") -> list[tuple[str, str]]:
    """User words -> ``[(mode, concept), ...]`` with mode ``guide`` or ``ignore``, in order, without repeats.

    A verb ("ignore", "disregard", "don't care about" / "focus on", "guide", "only care about", "look for") applies
    to the concepts after it until the next verb; "and", commas, "variations" and similar filler are skipped.
    Spellings: color/colour, gray/grey, center/centre.

    Example:
        >>> parse_concepts("ignore color and lighting, focus on cracks")
        [('ignore', 'colour'), ('ignore', 'lighting'), ('guide', 'cracks')]

    Raises:
        ConfigError: an unknown word (with a close match and the known concepts), a concept with no verb before it,
            or a concept both guided and ignored.
    """
    if text is None or not text.strip():
        return []
    concepts = load_vocabulary(vocabulary)
    table = _phrase_table(concepts)
    longest = max(len(key) for key in table)
    tokens = _normalise_text(text).split()
    mode: str | None = None
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        size, hit = _match(tokens, i, table, longest)
        if hit is None:
            if tokens[i] not in _STOPWORDS:
                raise ConfigError(_unknown_word_message(tokens[i], text, concepts))
        elif hit[0] == "verb":
            mode = hit[1]
        else:
            out.append(_clause(mode, hit[1], text))
        i += size
    return _dedupe(out, text)


def _match(
    tokens: list[str], i: int, table: dict[tuple[str, ...], tuple[str, str]], longest: int
) -> tuple[int, tuple[str, str] | None]:
    """The longest phrase of ``table`` starting at token ``i``: (its length, its entry), or (1, None)."""
    for n in range(min(longest, len(tokens) - i), 0, -1):
        hit = table.get(tuple(tokens[i : i + n]))
        if hit is not None:
            return n, hit
    return 1, None


def _clause(mode: str | None, concept: str, text: str) -> tuple[str, str]:
    if mode is None:
        raise ConfigError(
            f"{text!r} does not say what to do with {concept!r}: write 'ignore {concept}' or 'focus on {concept}'"
        )
    return mode, concept


def _dedupe(clauses: list[tuple[str, str]], text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for mode, concept in clauses:
        if (mode, concept) in out:
            continue
        if any(c == concept for _, c in out):
            raise ConfigError(f"{text!r} both ignores and focuses on {concept!r}; choose one")
        out.append((mode, concept))
    if not out:
        raise ConfigError(f"{text!r} names no concept; e.g. 'ignore colour' or 'focus on cracks'")
    return out


def _unknown_word_message(word: str, text: str, concepts: dict[str, Concept]) -> str:
    candidates = {alias: c.name for c in concepts.values() for alias in (c.name, *c.aliases) if " " not in alias}
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    hint = f"did you mean {candidates[close[0]]!r}? " if close else ""
    return f"unknown concept {word!r} in {text!r}; {hint}known concepts: {', '.join(sorted(concepts))}"


# ---------------------------------------------------------------------------------------------------- bases
@dataclass(frozen=True, eq=False)
class Basis:
    """An orthonormal basis of a concept subspace.

    Attributes:
        vectors: (k, D) float32 orthonormal rows, strongest direction first.
        explained: (k,) share of the concept's prompt variance each row captures (for a union of concepts, the mean
            over the concepts); ``explained.sum()`` is the share the whole subspace captures.
        concepts: the concept names it was built from.
        prompts: how many prompts were encoded for it.
    """

    vectors: torch.Tensor
    explained: torch.Tensor
    concepts: tuple[str, ...] = ()
    prompts: int = 0

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] < 1:
            raise ValueError(f"Basis.vectors must be (k, D) with k >= 1, got shape {tuple(self.vectors.shape)}")
        if tuple(self.explained.shape) != (self.vectors.shape[0],):
            raise ValueError(f"Basis.explained must be ({self.vectors.shape[0]},), got {tuple(self.explained.shape)}")
        object.__setattr__(self, "concepts", tuple(self.concepts))

    @property
    def k(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def total_explained(self) -> float:
        return float(self.explained.sum())


def prototypes(embeddings: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Concept prototypes and the prompt count.

    Args:
        embeddings: (n, D) one prototype per row; or (n, m, D) / a sequence of n (m_i, D) tensors, each group (one
            concept value's templates) averaged into one prototype (LAFT's list-of-lists).

    Returns:
        (n, D) float64 on the CPU, and the number of prompt embeddings given.
    """
    import torch

    if isinstance(embeddings, torch.Tensor):
        if embeddings.ndim == 2:
            return embeddings.detach().cpu().double(), int(embeddings.shape[0])
        if embeddings.ndim == 3:
            return embeddings.detach().cpu().double().mean(1), int(embeddings.shape[0] * embeddings.shape[1])
        raise ConfigError(f"concept embeddings must be (n, D) or (n, m, D), got shape {tuple(embeddings.shape)}")
    groups = [torch.atleast_2d(torch.as_tensor(g).detach().cpu().double()) for g in embeddings]
    if not groups or any(g.shape[0] == 0 for g in groups):
        raise ConfigError("concept embedding groups must be non-empty (m_i, D) tensors")
    return torch.stack([g.mean(0) for g in groups]), sum(g.shape[0] for g in groups)


def concept_basis(
    embeddings: torch.Tensor | Sequence[torch.Tensor],
    k: int | None = None,
    explained_variance: float = DEFAULT_EXPLAINED_VARIANCE,
    *,
    concepts: Sequence[str] = (),
) -> Basis:
    """The top-k eigenvectors of the covariance of a concept's prompt prototypes (= LAFT's pairwise-difference PCA).

    Args:
        embeddings: see :func:`prototypes`; text embeddings, unnormalised as in LAFT (normalised ones work too and
            weigh every prompt equally).
        k: number of directions, 1 <= k <= n - 1 (the centred prototypes' rank); if None, the smallest k whose
            variance ratios sum to at least ``explained_variance``.
        explained_variance: in (0, 1]; used when ``k`` is None.
        concepts: names to record in the basis.

    Returns:
        a :class:`Basis` with (k, D) float32 rows on the embeddings' device (computed in float64 on the CPU).

    Raises:
        ConfigError: fewer than 2 prototypes, no variance, or ``k`` / ``explained_variance`` out of range.
    """
    import torch

    protos, n_prompts = prototypes(embeddings)
    n = protos.shape[0]
    if n < 2:
        raise ConfigError(f"a concept basis needs at least 2 prototypes (concept values), got {n}")
    _, s, vh = torch.linalg.svd(protos - protos.mean(0), full_matrices=False)
    variance = s**2
    if float(variance.sum()) <= 1e-12 * max(float((protos**2).sum()), 1e-30):
        raise ConfigError(f"the {n} prompt prototypes of {list(concepts) or 'this concept'} are identical: no variance")
    ratio = variance / variance.sum()
    k = _choose_k(ratio, min(n - 1, protos.shape[1]), k, explained_variance)
    device = embeddings.device if isinstance(embeddings, torch.Tensor) else torch.as_tensor(embeddings[0]).device
    vectors = _canonical_signs(vh[:k])
    return Basis(vectors.float().to(device), ratio[:k].float(), tuple(concepts), n_prompts)


def _choose_k(ratio: torch.Tensor, rank: int, k: int | None, explained_variance: float) -> int:
    if k is None:
        if not 0.0 < explained_variance <= 1.0:
            raise ConfigError(f"explained_variance must be in (0, 1], got {explained_variance}")
        cumulative = ratio.cumsum(0)
        k = int((cumulative < explained_variance - 1e-9).sum()) + 1
        return min(k, rank)
    if not 1 <= k <= rank:
        raise ConfigError(f"k must be between 1 and {rank} (prototypes - 1, at most D), got {k}")
    if float(ratio[k - 1]) <= 1e-10:
        carrying = int((ratio > 1e-10).sum())
        raise ConfigError(f"k={k} asks for more directions than carry variance ({carrying})")
    return k


def _canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip rows so each one's largest-magnitude entry is positive (deterministic bases)."""
    import torch

    index = vectors.abs().argmax(dim=1)
    signs = torch.sign(vectors.gather(1, index[:, None]))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def merge_bases(bases: Sequence[Basis], *, exclude: Basis | None = None, tol: float = 1e-3) -> Basis:
    """The union of several subspaces, optionally minus its part inside ``exclude``.

    Args:
        bases: concept bases of the same dimension D.
        exclude: a subspace to remove first (``(I - PₑPₑᵀ)`` applied to every row).
        tol: singular values at or below it count as dependent directions and are dropped.

    Returns:
        an orthonormal basis of ``span(∪ bases)`` (⟂ ``exclude``); ``explained`` is, per direction, the mean over the
        concepts of the share of their captured variance it holds.

    Raises:
        ConfigError: no bases, mismatched D, or nothing left after removing ``exclude``.
    """
    import torch

    if not bases:
        raise ConfigError("merge_bases needs at least one basis")
    if len({b.dim for b in bases} | ({exclude.dim} if exclude else set())) != 1:
        raise ConfigError(f"bases of different dimensions cannot be merged: {sorted({b.dim for b in bases})}")
    if len(bases) == 1 and exclude is None:
        return bases[0]
    rows = torch.cat([b.vectors.detach().cpu().double() for b in bases])
    if exclude is not None:
        e = exclude.vectors.detach().cpu().double()
        rows = rows - (rows @ e.T) @ e
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    v = vh[s > tol]
    names = tuple(dict.fromkeys(c for b in bases for c in b.concepts))
    if v.shape[0] == 0:
        removed = list(exclude.concepts) if exclude else []
        raise ConfigError(f"nothing of {list(names)} is left outside the subspace of the ignored {removed}")
    explained = torch.zeros(v.shape[0], dtype=torch.float64)
    for b in bases:
        explained += (b.explained.cpu().double()[:, None] * (b.vectors.cpu().double() @ v.T) ** 2).sum(0)
    explained /= len(bases)
    order = explained.argsort(descending=True)
    vectors = _canonical_signs(v[order]).float().to(bases[0].vectors.device)
    return Basis(vectors, explained[order].float(), names, sum(b.prompts for b in bases))


# ---------------------------------------------------------------------------------------------------- transforms
def coordinates(x: torch.Tensor, basis: Basis) -> torch.Tensor:
    """(..., D) -> (..., k): coordinates in the concept subspace, ``x Bᵀ``."""
    return x @ basis.vectors.to(device=x.device, dtype=x.dtype).T


def guide(x: torch.Tensor, basis: Basis, *, normalize: bool = False) -> torch.Tensor:
    """(..., D) -> (..., D): projection onto the concept subspace, ``x Bᵀ B`` (optionally L2-normalised)."""
    import torch.nn.functional as F

    out = coordinates(x, basis) @ basis.vectors.to(device=x.device, dtype=x.dtype)
    return F.normalize(out, dim=-1) if normalize else out


def ignore(x: torch.Tensor, basis: Basis, *, normalize: bool = False) -> torch.Tensor:
    """(..., D) -> (..., D): projection onto the orthogonal complement, ``x - x Bᵀ B`` (optionally L2-normalised)."""
    import torch.nn.functional as F

    out = x - guide(x, basis)
    return F.normalize(out, dim=-1) if normalize else out


@runtime_checkable
class FeatureTransform(Protocol):
    """What a scorer's ``transform`` is: a map of (..., D) features to (..., D) features that can say what it does.
    :class:`ConceptTransform` (LAFT) is one; the rules chain a scorer's own transform with theirs."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> str: ...


@dataclass(frozen=True, eq=False)
class ConceptTransform:
    """A LAFT feature transform: ``guide`` (keep only the concept subspace) or ``ignore`` (remove it).

    Attributes:
        mode: ``guide`` or ``ignore``.
        basis: the subspace.
        normalize: L2-normalise the output.
        ignored: for a guide transform built with ignore clauses too, the concepts removed from its basis.
    """

    mode: str
    basis: Basis
    normalize: bool = False
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"LAFT mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        object.__setattr__(self, "ignored", tuple(self.ignored))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        op = guide if self.mode == "guide" else ignore
        return op(x, self.basis, normalize=self.normalize)

    def describe(self) -> str:
        """One line, e.g. ``ignore colour and lighting (k=7, 93% of variance)``."""
        names = _join(self.basis.concepts)
        stats = f"(k={self.basis.k}, {round(100 * self.basis.total_explained)}% of variance)"
        if self.mode == "ignore":
            return f"ignore {names} {stats}"
        removed = f", with {_join(self.ignored)} projected out" if self.ignored else ""
        return f"focus on {names}{removed} {stats}"


def _join(names: Sequence[str]) -> str:
    words = [n.replace("_", " ") for n in names]
    return " and ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " and " + words[-1]


# ---------------------------------------------------------------------------------------------------- text
def encode_prompts(backbone: ClipBackbone, prompts: Sequence[str], *, normalize: bool = False) -> torch.Tensor:
    """(n, D) float32 text embeddings on the backbone's device; unnormalised by default (LAFT's choice)."""
    import torch

    if normalize:
        return backbone.encode_text(prompts)
    if not prompts:
        raise ConfigError("encode_prompts needs at least one prompt")
    chunks = []
    with torch.no_grad():
        for start in range(0, len(prompts), 256):
            tokens = backbone.tokenizer(list(prompts[start : start + 256])).to(backbone.device)
            chunks.append(backbone.model.encode_text(tokens).float())
    return torch.cat(chunks)


def basis_for_concept(
    backbone: ClipBackbone,
    concept: Concept,
    *,
    k: int | None = None,
    explained_variance: float = DEFAULT_EXPLAINED_VARIANCE,
    object_name: str = "object",
) -> Basis:
    """Encode a vocabulary concept's prompts (values x templates) and build its basis.

    ``k`` is capped at the concept's rank (values - 1); the templates of each value are averaged into one prototype.
    """
    groups = concept.prompts(object_name)
    flat = [p for group in groups for p in group]
    embeddings = encode_prompts(backbone, flat).reshape(len(groups), len(concept.templates), -1)
    if k is not None and k > len(groups) - 1:
        logger.info("LAFT concept %s has %d values: k capped at %d", concept.name, len(groups), len(groups) - 1)
        k = len(groups) - 1
    return concept_basis(embeddings, k, explained_variance, concepts=(concept.name,))


def build_transform(
    backbone: ClipBackbone,
    text: str | None,
    *,
    k: int | None = None,
    explained_variance: float = DEFAULT_EXPLAINED_VARIANCE,
    object_name: str = "object",
    vocabulary: str = "laft",
) -> ConceptTransform | None:
    """The transform the user's words ask for, or None when ``text`` is empty.

    Ignored concepts are combined into the union of their subspaces, guided ones likewise; with both, the result is a
    guide transform onto the guided subspace minus its part inside the ignored one (see the module docstring).

    Args:
        backbone: the CLIP backbone whose text tower embeds the prompts (its image features are what gets transformed).
        text: e.g. ``"ignore colour and lighting"`` or ``"focus on cracks"``; see :func:`parse_concepts`.
        k: directions per concept (capped at each concept's rank); None: by ``explained_variance``.
        explained_variance: per-concept variance share when ``k`` is None.
        object_name: fills ``{object}`` in the templates.
        vocabulary: prompt file name in ``prompts/``.
    """
    clauses = parse_concepts(text, vocabulary)
    if not clauses:
        return None
    concepts = load_vocabulary(vocabulary)
    bases = {
        name: basis_for_concept(
            backbone, concepts[name], k=k, explained_variance=explained_variance, object_name=object_name
        )
        for _, name in clauses
    }
    ignored = [bases[name] for mode, name in clauses if mode == "ignore"]
    guided = [bases[name] for mode, name in clauses if mode == "guide"]
    ignore_basis = merge_bases(ignored) if ignored else None
    if not guided:
        transform = ConceptTransform("ignore", ignore_basis)  # type: ignore[arg-type]
    else:
        ignored_names = ignore_basis.concepts if ignore_basis else ()
        transform = ConceptTransform("guide", merge_bases(guided, exclude=ignore_basis), ignored=ignored_names)
    if transform.basis.k > transform.basis.dim // 2:
        logger.warning("LAFT %s uses %d of %d dimensions", transform.describe(), transform.basis.k, transform.basis.dim)
    return transform
