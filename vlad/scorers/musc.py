"""MuSc: zero-shot mutual scoring of a batch of unlabeled images (Li et al., "MuSc: Zero-Shot Industrial Anomaly
Classification and Segmentation with Mutual Scoring of the Unlabeled Images", ICLR 2024, arXiv 2401.16753), after the
reference code ``xrli-U/MuSc``.

No prompts and no training. Normal patches find close matches in the other images of the batch, anomalous ones do not:

1. features: patch tokens of several layers (default the quarter points of the tower, e.g. 6/12/18/24 of ViT-L/14,
   the reference's layers) and the normalised global embedding;
2. LNAMD, per layer and aggregation degree r in ``r_list``: LayerNorm over (C, H, W) of each image's token grid (no
   affine), each patch replaced by the mean of its r x r neighbourhood (zero padding, stride 1, padding counted), then
   L2 normalisation. The reference unfolds the r x r x C block and ``adaptive_avg_pool1d``-s it back to C; with
   channel-major flattening that is exactly ``avg_pool2d(count_include_pad=True)``, which is what runs here (the
   divisor is the same for every channel of a patch, so after the L2 normalisation padding counts do not matter);
3. MSM: for image i, patch p and every *other* batch member j, ``d_j(p) = min_q ||z_p - z_q||``; the patch score is the
   mean of the smallest 30 % (at least one) of those N - 1 values; averaged over layers, then over degrees;
4. RsCIN: the image score ``max(map)`` is smoothed over the image-similarity graph ``W = G G^T``: for each k in
   ``k_list`` keep each row's k largest entries (self included), row-normalise to P_k, ``s_k = P_k s``; mean over k.

Deviations, on purpose:
- patch tokens are vlad's projected ones (``ln_post`` then ``proj``, see :mod:`vlad.backbones.clip`); the reference
  uses the raw residual-stream tokens. Both are per-token affine images of the same tokens, but LNAMD's LayerNorm and
  the distances are not invariant to that map, so numbers differ from the paper's.
- RsCIN smooths the raw maxima instead of their min-max normalised values. Every P_k is row-stochastic, so smoothing
  commutes with the (per-batch affine) min-max map: the ranking is the reference's, and ``pred_score`` stays on the
  map scale, where a fixed threshold means something. The reference's normalised value is ``meta["batch_score"]``.
- RsCIN keeps every entry tied with a row's k-th largest (ties would otherwise be broken by batch order), clamps
  negative similarities to 0 (so a row never sums to zero) and clips k to the number of scored images.
- the map is upsampled by vlad's shared helper (bilinear, ``align_corners=False``); the reference uses True.
- ``fit(references)`` adds the references to every batch as extra members that are compared against but not scored,
  and they take no part in RsCIN. This makes a single image scorable. The reference has no such mode.
- no ``divide_num`` subsets: the whole batch is scored at once; memory is bounded by chunking the distances instead.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vlad.backbones import DEFAULT_BACKBONE
from vlad.backbones.clip import ClipBackbone
from vlad.errors import ConfigError
from vlad.result import AnomalyResult
from vlad.scorers.base import Features, ImageLike, Scorer, as_pil, sync_device
from vlad.thresholds import Thresholds

logger = logging.getLogger(__name__)

TOPMIN_FRACTION = 0.3
"""Share of the other images whose nearest-patch distances are averaged (the reference's interval [0, 0.3])."""

CHUNK_ELEMENTS = 2**25
"""Most pairwise distances one ``torch.cdist`` call produces: 32 M fp32 values, 128 MiB (plus as much for its
matrix-product temporaries). ViT-L/14 at 518 px has 1369 patches, so one call covers about 17 image pairs."""

SMALL_BATCH = 10
"""Batches (scored images plus references) smaller than this carry a warning: MuSc is designed for tens of images."""


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The quarter points of a tower with ``num_layers`` blocks, 1-based: 24 -> (6, 12, 18, 24), 4 -> (1, 2, 3, 4)."""
    return tuple(sorted({max(1, round(num_layers * q / 4)) for q in (1, 2, 3, 4)}))


def lnamd(tokens: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """Local neighbourhood aggregation of one layer's patch tokens at degree ``r``.

    Args:
        tokens: (B, N, C) patch tokens, N = gh * gw in row-major order.
        grid: (gh, gw).
        r: odd neighbourhood side in patches; 1 keeps single patches.

    Returns:
        (B, N, C) L2-normalised features.
    """
    b, n, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, *grid)
    x = F.layer_norm(x, x.shape[1:])
    if r > 1:
        x = F.avg_pool2d(x, r, stride=1, padding=r // 2, count_include_pad=True)
    return F.normalize(x.flatten(2).transpose(1, 2), dim=-1)


def nearest_patch_distances(
    query: torch.Tensor, bank: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """Distance from every query patch to its nearest patch in each bank image.

    Args:
        query: (Nq, P, C) features.
        bank: (Nb, Q, C) features.
        chunk_elements: most distances computed per ``torch.cdist`` call (whole images at least one pair at a time).

    Returns:
        (Nq, Nb, P): ``[i, j, p] = min_q ||query[i, p] - bank[j, q]||``.
    """
    nq, p, c = query.shape
    nb, q, _ = bank.shape
    per_bank = max(1, min(nb, chunk_elements // (p * q)))
    per_query = max(1, min(nq, chunk_elements // (p * q * per_bank)))
    out = query.new_empty(nq, nb, p)
    for j0 in range(0, nb, per_bank):
        b = bank[j0 : j0 + per_bank]
        flat_bank = b.reshape(-1, c)
        for i0 in range(0, nq, per_query):
            a = query[i0 : i0 + per_query]
            d = torch.cdist(a.reshape(-1, c), flat_bank).reshape(a.shape[0], p, b.shape[0], q)
            out[i0 : i0 + a.shape[0], j0 : j0 + b.shape[0]] = d.amin(dim=-1).transpose(1, 2)
    return out


def mutual_scores(
    z: torch.Tensor, n_scored: int, fraction: float = TOPMIN_FRACTION, chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """MSM: score the first ``n_scored`` batch members against all the others.

    Args:
        z: (M, P, C) features of every batch member; the first ``n_scored`` are scored, the rest are only compared
            against (references).
        n_scored: how many members to score, 1 <= n_scored <= M, M >= 2.
        fraction: share of the M - 1 per-image distances averaged, smallest first; at least one value.
        chunk_elements: see :func:`nearest_patch_distances`.

    Returns:
        (n_scored, P) patch scores.
    """
    m = z.shape[0]
    d = nearest_patch_distances(z[:n_scored], z, chunk_elements)  # (n_scored, M, P)
    own = torch.arange(n_scored, device=z.device)
    d[own, own] = float("inf")
    k = max(1, math.floor(fraction * (m - 1) + 1e-9))
    return d.topk(k, dim=1, largest=False).values.mean(dim=1)


def rscin(scores: torch.Tensor, embeddings: torch.Tensor, k_list: Sequence[int]) -> torch.Tensor:
    """Re-score images over their constrained image-level neighbourhood.

    Args:
        scores: (n,) image scores.
        embeddings: (n, D) L2-normalised global embeddings.
        k_list: neighbourhood sizes, the image itself included; each is clipped to n.

    Returns:
        (n,) mean over k of ``P_k @ scores``, P_k the row-normalised k-nearest part of ``W = G G^T``.
    """
    w = (embeddings @ embeddings.T).clamp_min(0.0)
    n = w.shape[0]
    smoothed = []
    for k in k_list:
        kth = w.topk(min(k, n), dim=1).values[:, -1:]
        wk = torch.where(w >= kth, w, torch.zeros_like(w))
        p = wk / wk.sum(dim=1, keepdim=True).clamp_min(1e-12)
        smoothed.append(p @ scores)
    return torch.stack(smoothed).mean(dim=0)


def _positive_ints(values: Sequence[int], option: str, example: str, *, odd: bool = False) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if not out or any(v < 1 or (odd and v % 2 == 0) for v in out):
        kind = "odd positive" if odd else "positive"
        raise ConfigError(f"{option} must hold {kind} neighbourhood sizes such as {example}, got {tuple(values)}")
    return out


class MuscScorer(Scorer):
    """MuSc: mutual scoring of a batch of unlabeled images of one product (ICLR 2024); zero-shot, no prompts.

    Args:
        backbone: default ``openclip:ViT-L-14-336-quickgelu@openai``, run at 518 px as in the reference code (other
            backbones at their native size).
        layers: 1-based transformer blocks whose patch tokens are used (negative counts from the end); default the
            quarter points, see :func:`default_layers`.
        r_list: LNAMD aggregation degrees (odd patch counts).
        k_list: RsCIN neighbourhood sizes (the reference uses (1, 2, 3) on MVTec AD and (1, 8, 9) on VisA).
        fraction: share of the other images whose nearest-patch distances are averaged, smallest first.
        chunk_elements: most pairwise distances per ``torch.cdist`` call (bounds memory, see :data:`CHUNK_ELEMENTS`).
        **kwargs: see :class:`~vlad.scorers.base.Scorer`.

    Use :meth:`score_many` on a batch of images of one product (tens of them, mostly normal): each image is scored
    against the others, so scores are relative to the batch and a batch of only defective parts breaks the premise.
    :meth:`score` of a single image works only after :meth:`fit` (the references join every batch unscored).

    Scores are on the map scale: Euclidean distances between L2-normalised features, in [0, 2], where ``d = 0.5``
    means a best match of cosine ``1 - d^2 / 2 = 0.875``. The zero-shot default threshold 0.5 (image and pixel) with
    scale 0.5 (normalised score 0 at ``d <= 0.25``, 1 at ``d >= 0.75``) is a geometric choice, not measured on any
    dataset. With two or more references the thresholds are calibrated leave-one-out by the base class: each
    reference is scored against the others exactly as a single image is scored against the references. A batch
    compares an image with more members than that (the other images too), so calibrated thresholds are approximate.
    """

    name = "musc"
    default_backbone = DEFAULT_BACKBONE
    default_threshold = 0.5
    default_scale = 0.5
    transductive: ClassVar[bool] = True
    reference_image_size: ClassVar[int] = 518

    def __init__(
        self,
        backbone: str | ClipBackbone | None = None,
        *,
        layers: Sequence[int] | None = None,
        r_list: Sequence[int] = (1, 3, 5),
        k_list: Sequence[int] = (1, 2, 3),
        fraction: float = TOPMIN_FRACTION,
        chunk_elements: int = CHUNK_ELEMENTS,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        self.layers = self._resolve_layers(layers)
        self.r_list = _positive_ints(r_list, "r_list", "(1, 3, 5)", odd=True)
        self.k_list = _positive_ints(k_list, "k_list", "(1, 2, 3)")
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
        if chunk_elements < 1:
            raise ConfigError(f"chunk_elements must be >= 1, got {chunk_elements}")
        self.fraction = float(fraction)
        self.chunk_elements = int(chunk_elements)
        self._batch_warning: str | None = None

    def default_image_size(self) -> int:
        """518 px for ViT-L/14@336 (the reference's setting), else the backbone's native size."""
        if (self.backbone.patch_size, self.backbone.native_size) == (14, 336):
            return self.reference_image_size
        return self.backbone.native_size

    def _resolve_layers(self, layers: Sequence[int] | None) -> tuple[int, ...]:
        n = self.backbone.num_layers
        if layers is None:
            return default_layers(n)
        chosen = tuple(sorted({n + 1 + int(v) if v < 0 else int(v) for v in layers}))
        if not chosen or not all(1 <= v <= n for v in chosen):
            raise ConfigError(f"layers {tuple(layers)} invalid: {self.backbone.spec} has layers 1..{n} (or -1..-{n})")
        return chosen

    # ------------------------------------------------------------------ subclass API
    def _extract(self, x: torch.Tensor) -> Features:
        out = self.backbone.forward_visual(x, layers=self.layers)
        feats = {"global": self.steer(F.normalize(out.global_embedding.float(), dim=-1))}
        for layer in self.layers:
            tokens = out.patch_tokens[layer].float()
            feats[f"layer{layer}"] = tokens if self.transform is None else self.steer(F.normalize(tokens, dim=-1))
        return feats

    def _score(self, feats: Features, object_name: str, memory: Features | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Score the images in ``feats`` against each other and the references in ``memory`` (compared, unscored).

        Returns:
            (n,) RsCIN image scores and (n, gh, gw) patch maps, both on the distance scale.
        """
        n = feats["global"].shape[0]
        self._check_batch(n, 0 if memory is None else memory["global"].shape[0])
        total = torch.zeros(n, self.grid[0] * self.grid[1], device=feats["global"].device)
        for r in self.r_list:
            for layer in self.layers:
                tokens = feats[f"layer{layer}"]
                if memory is not None:
                    tokens = torch.cat([tokens, memory[f"layer{layer}"]])
                total += mutual_scores(lnamd(tokens, self.grid, r), n, self.fraction, self.chunk_elements)
        maps = total / (len(self.r_list) * len(self.layers))  # equal counts: mean over layers, then degrees
        scores = rscin(maps.amax(dim=1), feats["global"], self.k_list)
        return scores, maps.reshape(n, *self.grid)

    def _memory(self, refs: Features, keep: torch.Tensor) -> Features:
        """The kept references, as extra unscored batch members."""
        return {k: v[keep.to(v.device)] for k, v in refs.items()}

    def _calibrate(self, object_name: str) -> Thresholds:
        """Leave-one-out on the references (base class); MuSc uses no text, so one calibration serves every name."""
        return super()._calibrate("")

    # ------------------------------------------------------------------ scoring
    def _check_batch(self, n_scored: int, n_references: int) -> None:
        if n_scored == 0:
            raise ConfigError("musc needs at least one image to score, got an empty batch")
        if n_scored + n_references < 2:
            raise ConfigError(
                "musc scores images against each other: pass score_many() a batch of at least 2 images of the same "
                "product, or fit() normal references first (got 1 image and no references)"
            )

    def score_many(self, images: Sequence[ImageLike], object_name: str = "object") -> list[AnomalyResult]:
        """Score ``images`` of one product as ONE batch, each against all the others (and the references).

        Results follow the order of ``images`` and do not depend on it. Besides the base fields, ``meta`` holds
        ``batch_score`` (the reference code's min-max normalised RsCIN score, relative to this batch) and
        ``batch_size`` (scored images plus references).
        """
        object_name = object_name.strip() or "object"
        pil = [as_pil(im) for im in images]
        self._check_batch(len(pil), self._n_references)
        th = self.thresholds(object_name)
        memory = self._full_memory()
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = self._extract_many(pil)
            t1 = time.perf_counter()
            scores, maps = self._score(feats, object_name, memory)
        sync_device(self.backbone.device)
        t2 = time.perf_counter()
        n, members = len(pil), len(pil) + self._n_references
        timings = {"model": (t1 - t0) / n, "mutual_scoring": (t2 - t1) / n}
        relative = _min_max_relative(scores, maps.flatten(1).amax(dim=1))
        self._batch_warning = _small_batch_warning(members)
        results = self._results(pil, scores, maps, th, timings)
        for result, rel in zip(results, relative, strict=True):
            result.meta.update({"batch_score": round(rel, 6), "batch_size": members})
        return results

    def warnings(self) -> tuple[str, ...]:
        """The base warnings plus the small-batch one of the latest :meth:`score_many`."""
        extra = (self._batch_warning,) if self._batch_warning else ()
        return super().warnings() + extra

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "layers": list(self.layers),
            "r_list": list(self.r_list),
            "k_list": list(self.k_list),
            "fraction": self.fraction,
        }


def _small_batch_warning(members: int) -> str | None:
    if members >= SMALL_BATCH:
        return None
    return (
        f"musc compared each image with only {members - 1} other image{'s' if members > 2 else ''}; it is designed "
        "for batches of tens of images of one product, so these scores are noisy"
    )


def _min_max_relative(scores: torch.Tensor, raw: torch.Tensor) -> list[float]:
    """The reference's RsCIN output: ``scores`` on the scale where the batch's raw maxima span [0, 1]."""
    low, span = float(raw.min()), float(raw.max() - raw.min())
    if span <= 0:
        return [0.0] * scores.shape[0]
    return [(float(s) - low) / span for s in scores]
