"""MuSc: zero-shot mutual scoring of a batch of unlabeled images (Li et al., "MuSc: Zero-Shot Industrial Anomaly
Classification and Segmentation with Mutual Scoring of the Unlabeled Images", ICLR 2024, arXiv 2401.16753), after the
reference code ``xrli-U/MuSc`` (``models/musc.py``, ``models/modules/*``, its bundled ``open_clip``).

No prompts and no training. Normal patches find close matches in the other images of the batch, anomalous ones do not:

1. features: the residual-stream patch tokens after several blocks (default the quarter points of the tower, e.g.
   6/12/18/24 of ViT-L/14, the reference's ``feature_layers: [5, 11, 17, 23]`` 0-based) and the normalised global
   embedding;
2. LNAMD, per layer and aggregation degree r in ``r_list``: LayerNorm over (C, H, W) of each image's token grid, each
   patch replaced by the mean of its r x r neighbourhood (zero padding, padding counted), then L2 normalisation;
3. MSM: for image i, patch p and every *other* batch member j, ``d_j(p) = min_q ||z_p - z_q||``; the patch score is the
   mean of the smallest 30 % of those N - 1 values; averaged over layers, then over degrees;
4. RsCIN: the image score ``max(map)`` is smoothed over the image-similarity graph ``W = G G^T``: for each k in
   ``k_list`` keep each row's k largest entries, row-normalise to P_k, ``s_k = P_k s``; mean over k.

Two profiles (``profile=``, see :data:`vlad.scorers.base.PROFILES`):

``paper`` (the default) runs the official inference computation on the same weights, op for op, so that maps and
image scores agree with the official code's to float rounding (docs/methods.md lists every step with its reference
file and line). It reads the raw residual-stream tokens the reference taps (its bundled open_clip, LND layout,
attention with ``need_weights=True``), runs the MLPs with the activation the reference's model has (exact GELU for
OpenAI weights away from their native size: the reference rebuilds the tower from its JSON config then; QuickGELU
at the native size), re-grids the positional embedding with plain bicubic (no antialias), runs the forward pass in
batches of 4 under fp16 autocast on CUDA (fp32 weights), does LNAMD by ``unfold`` + ``adaptive_avg_pool1d`` and
normalises on the CPU, scores with one ``cdist`` per image, averages in float64, upsamples the patch-grid map
bilinearly with ``align_corners=True``, takes the image score as the maximum of the map at the model's input size,
min-max normalises those maxima over the batch and smooths them with the reference's RsCIN (no clamping, ties as
``topk`` breaks them). ``pred_score`` is then the official image score: relative to the batch, in [0, 1] when the
kept similarities are positive. Guards where the reference fails, each documented where it acts:

- batches of 2 to 4 members average the single nearest image (the reference's ``int(0.3 * (N - 1))`` is 0 there and
  its scores NaN);
- a k in ``k_list`` larger than the batch keeps the whole row (the reference's ``topk`` raises);
- equal maxima over the batch normalise to 0 (the reference divides by zero).

Output geometry: the reference's map is ``image_size`` x ``image_size`` (the model's input, every image stretched to
it); vlad's map is at the input image's own resolution, interpolated with ``align_corners=True`` straight from the
patch grid. For an input of ``image_size`` x ``image_size`` pixels (518 x 518 by default) the two are the same array;
for other sizes vlad's map is the same bilinear surface sampled at the input's pixels. The image score is always the
maximum of the ``image_size`` x ``image_size`` map, as in the reference. The preprocessing is the reference's (stretch
to the square input with PIL bicubic, CLIP mean and std) for every aspect ratio; its ground-truth masks, not its
images, are resized differently (bilinear), which does not concern scoring. Files go through vlad's loader (EXIF
orientation, alpha onto grey); the reference's ``convert("RGB")`` gives the same pixels for 8-bit RGB and grey files.

Beyond the reference, in both profiles: ``fit(references)`` makes references batch members. In the paper profile they
are ordinary members (scored, min-max normalised and RsCIN-smoothed with the images, as the official code would treat
a batch of images plus references; only the images' results are returned), so calibrated image thresholds are on the
batch-relative scale. Concept steering (LAFT) acts on joint-space tokens, which the paper profile does not use: with
concepts, MuSc runs its vlad profile and every result says so.

``vlad`` profile deviations, on purpose:

- patch tokens are vlad's projected ones (``ln_post`` then ``proj``, see :mod:`vlad.backbones.clip`) from the
  backbone's own forward (its activation, its attention kernel). Both are per-token affine images of the same tokens,
  but LNAMD's LayerNorm and the distances are not invariant to that map, so numbers differ from the paper's.
- LNAMD by ``avg_pool2d(count_include_pad=True)``: with channel-major flattening that is exactly the reference's
  unfold + ``adaptive_avg_pool1d``; distances in chunks bounded by ``chunk_elements``, in float32.
- RsCIN smooths the raw maxima of the patch-grid map instead of their min-max normalised values. Every P_k is
  row-stochastic, so smoothing commutes with the (per-batch affine) min-max map: the ranking is the reference's, and
  ``pred_score`` stays on the map scale, where a fixed threshold means something. The reference's normalised value
  is ``meta["batch_score"]``.
- RsCIN keeps every entry tied with a row's k-th largest (ties would otherwise be broken by batch order), clamps
  negative similarities to 0 (so a row never sums to zero) and clips k to the number of scored images.
- the map is upsampled by vlad's shared helper (bilinear, ``align_corners=False``); the reference uses True.
- references are compared against but not scored, and take no part in RsCIN.
- no ``divide_num`` subsets in either profile: the whole batch is scored at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from vlad.backbones import DEFAULT_BACKBONE, parse_spec
from vlad.backbones.clip import ClipBackbone
from vlad.errors import BackboneError, ConfigError
from vlad.result import AnomalyResult
from vlad.scorers.base import Features, ImageLike, Scorer, as_pil, check_profile, sync_device
from vlad.thresholds import Thresholds

logger = logging.getLogger(__name__)

TOPMIN_FRACTION = 0.3
"""Share of the other images whose nearest-patch distances are averaged (the reference's interval [0, 0.3])."""

CHUNK_ELEMENTS = 2**25
"""Most pairwise distances one ``torch.cdist`` call produces in the vlad profile: 32 M fp32 values, 128 MiB (plus as
much for its matrix-product temporaries). ViT-L/14 at 518 px has 1369 patches, so one call covers about 17 pairs."""

PAPER_CHUNK_ELEMENTS = 2**30
"""The paper profile's bound: the reference computes one image against all the others in one ``cdist`` call, and the
matrix product's rounding can depend on its shape, so the paper profile splits only batches beyond this (1 G
distances, 4 GiB: 572 other images of 1369 patches)."""

PAPER_BATCH_SIZE = 4
"""Images per forward pass (and per LNAMD call) in the paper profile: the reference's ``batch_size``
(configs/musc.yaml:10). The float rounding of a forward pass depends on its batch, so this is fixed."""

RSCIN_K_LISTS = {"mvtec": (1, 2, 3), "visa": (1, 8, 9), "btad": (1, 2, 3)}
"""RsCIN neighbourhood sizes per dataset, as the reference sets them (models/musc.py:242-247; any other dataset gets
(1, 2, 3))."""

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


# ---------------------------------------------------------------------- the paper profile: the reference, op for op
def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The reference's ``QuickGELU`` (open_clip/transformer.py:32-35)."""
    return x * torch.sigmoid(1.702 * x)


def official_block(
    block: torch.nn.Module, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """One residual block as the reference's bundled open_clip runs it (transformer.py:221-249), on (L, B, width)
    tokens: ``nn.MultiheadAttention(batch_first=False)`` with ``need_weights=True`` never takes the fused fast path,
    so it is ``F.multi_head_attention_forward`` with explicit attention weights, called here with the block's own
    parameters. ``act`` replaces the block's MLP activation; the block itself is not modified."""
    attn = block.attn
    y = block.ln_1(x)
    a, _ = F.multi_head_attention_forward(
        y,
        y,
        y,
        attn.embed_dim,
        attn.num_heads,
        attn.in_proj_weight,
        attn.in_proj_bias,
        attn.bias_k,
        attn.bias_v,
        attn.add_zero_attn,
        attn.dropout,
        attn.out_proj.weight,
        attn.out_proj.bias,
        training=False,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    )
    x = x + block.ls_1(a)
    mlp = block.mlp
    return x + block.ls_2(mlp.c_proj(act(mlp.c_fc(block.ln_2(x)))))


def _check_official_blocks(backbone: ClipBackbone) -> None:
    for block in backbone.model.visual.transformer.resblocks:
        attn = getattr(block, "attn", None)
        if (
            not isinstance(attn, torch.nn.MultiheadAttention)
            or not attn._qkv_same_embed_dim
            or attn.bias_k is not None
            or hasattr(block, "ln_1_kv")
            or list(getattr(getattr(block, "mlp", None), "_modules", {})) != ["c_fc", "gelu", "c_proj"]
        ):
            raise BackboneError(
                f"{backbone.spec}: the musc paper profile runs open_clip's standard ResidualAttentionBlock only; "
                "use profile='vlad' for this tower"
            )


def official_lnamd(
    layer_tokens: Sequence[torch.Tensor], grid: tuple[int, int], r: int, chunk: int = PAPER_BATCH_SIZE
) -> list[torch.Tensor]:
    """LNAMD as the reference computes it (models/modules/_LNAMD.py:11-128, models/musc.py:189-200).

    Args:
        layer_tokens: per layer, (B, N, C) raw patch tokens (class token removed) on the compute device.
        grid: (gh, gw).
        r: aggregation degree.
        chunk: images per call (the reference's data-loader batch).

    Returns:
        per layer, (B, N, C) features on the CPU, L2-normalised there (the reference normalises after ``.cpu()``).
    """
    b, _, c = layer_tokens[0].shape
    per_layer: list[list[torch.Tensor]] = [[] for _ in layer_tokens]
    for start in range(0, b, chunk):
        pooled = []
        for tokens in layer_tokens:
            t = tokens[start : start + chunk]
            x = t.reshape(t.shape[0], *grid, c).permute(0, 3, 1, 2)
            shape = x.shape[1:]
            ones = torch.ones(shape, device=x.device, dtype=x.dtype)  # nn.LayerNorm's fresh affine parameters
            x = F.layer_norm(x, shape, ones, torch.zeros_like(ones), 1e-5)
            if r != 1:
                u = F.unfold(x, kernel_size=r, dilation=1, padding=(r - 1) // 2, stride=1)
                u = u.reshape(*x.shape[:2], r, r, -1).permute(0, 4, 1, 2, 3)
            else:
                u = x.reshape(x.shape[0], x.shape[1], -1, 1, 1).permute(0, 2, 1, 3, 4)
            u = u.reshape(-1, *u.shape[-3:])
            pooled.append(F.adaptive_avg_pool1d(u.reshape(len(u), 1, -1), c).squeeze(1))
        feats = torch.stack(pooled, dim=1)
        feats = feats.reshape(-1, grid[0] * grid[1], *feats.shape[-2:]).cpu()  # (B, N, layers, C)
        feats /= feats.norm(dim=-1, keepdim=True)
        for i in range(len(layer_tokens)):
            per_layer[i].append(feats[:, :, i, :])
    return [torch.cat(parts, dim=0) for parts in per_layer]


def official_topmin_count(n_others: int, fraction: float) -> int:
    """How many of the ``n_others`` nearest-image distances the reference averages (models/modules/_MSM.py:159-166:
    ``int(n * fraction)`` for a fraction below 1, else ``int(fraction)`` images), at least one (vlad's guard: the
    reference's 0 gives NaN scores for batches of up to 4 members)."""
    k = int(n_others * fraction) if fraction < 1 else int(fraction)
    return min(max(1, k), n_others)


def official_msm(z: torch.Tensor, fraction: float = TOPMIN_FRACTION, chunk_elements: int = PAPER_CHUNK_ELEMENTS):
    """MSM as the reference computes it (models/modules/_MSM.py:150-199): every member against all the others.

    Args:
        z: (M, P, C) features of every batch member, M >= 2.
        fraction: see :func:`official_topmin_count`.
        chunk_elements: most distances per ``cdist`` call (whole images; the reference makes one call per image).

    Returns:
        (M, P) float64 patch scores, on ``z``'s device.
    """
    m, p, c = z.shape
    per_call = max(1, chunk_elements // (p * p))
    rows = []
    for i in range(m):
        others = torch.cat((z[:i], z[i + 1 :]), dim=0)
        parts = []
        for j0 in range(0, m - 1, per_call):
            o = others[j0 : j0 + per_call]
            d = torch.cdist(z[i : i + 1], o.reshape(-1, c)).reshape(p, o.shape[0], p)
            parts.append(torch.min(d, -1)[0])
        d = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        k = official_topmin_count(d.shape[1], fraction)
        vals, _ = torch.topk(d.float(), k, largest=False, sorted=True)
        vals, _ = torch.topk(vals.float(), k, largest=True, sorted=True)  # the interval [0, k): topmin_min = 0
        rows.append(vals.clone().mean(dim=1).double())
    return torch.stack(rows)


def _official_mmo(w: torch.Tensor, score: torch.Tensor, k_list: Sequence[int]) -> torch.Tensor:
    """The reference's multi-window mask operation (models/modules/_RsCIN.py:213-229), on the CPU in float32.
    A k above the batch size keeps the whole row (the reference's ``topk`` raises there)."""
    n = w.shape[0]
    smoothed = []
    for k in k_list:
        _, drop = torch.topk(w.float(), max(n - k, 0), largest=False, sorted=True)
        w_mask = w.clone()
        for i in range(n):
            w_mask[i, drop[i]] = 0
        d = torch.zeros_like(w).float()
        for i in range(n):
            d[i, i] = 1 / (w_mask[i, :].sum())
        smoothed.append((d @ w_mask) @ score.clone().unsqueeze(-1))
    return torch.concat(smoothed, -1).mean(-1)


def official_rscin(maxima: np.ndarray, cls_tokens: np.ndarray, k_list: Sequence[int]) -> np.ndarray:
    """RsCIN as the reference computes it (models/modules/_RsCIN.py:231-240).

    Args:
        maxima: (M,) float64 map maxima.
        cls_tokens: (M, D) normalised global embeddings, float32 (float16 where the reference ran under autocast).
        k_list: neighbourhood sizes (the reference's 0, which returns ``maxima`` unchanged, is not offered).

    Returns:
        (M,) min-max normalised, smoothed scores (float32); equal maxima normalise to 0 (the reference's 0 / 0).
    """
    span = maxima.max() - maxima.min()
    scores = (maxima - maxima.min()) / span if span > 0 else np.zeros_like(maxima)
    w = torch.tensor(cls_tokens @ cls_tokens.T)
    return _official_mmo(w.clone().float(), torch.tensor(scores).clone().float(), k_list).numpy()


class MuscScorer(Scorer):
    """MuSc: mutual scoring of a batch of unlabeled images of one product (ICLR 2024); zero-shot, no prompts.

    Args:
        backbone: default ``openclip:ViT-L-14-336-quickgelu@openai``, run at 518 px as in the reference code (other
            backbones at their native size).
        layers: 1-based transformer blocks whose patch tokens are used (negative counts from the end); default the
            quarter points, see :func:`default_layers`.
        r_list: LNAMD aggregation degrees (odd patch counts).
        k_list: RsCIN neighbourhood sizes, the image itself included; default the reference's for ``dataset``.
        dataset: ``mvtec`` (k_list (1, 2, 3), the default), ``visa`` ((1, 8, 9)) or ``btad`` ((1, 2, 3)); only
            selects the default ``k_list``.
        fraction: share of the other images whose nearest-patch distances are averaged, smallest first (in the
            paper profile rounded down as the reference does, and 1.0 means one image, as there).
        chunk_elements: most pairwise distances per ``torch.cdist`` call (bounds memory); default
            :data:`CHUNK_ELEMENTS` in the vlad profile, :data:`PAPER_CHUNK_ELEMENTS` in the paper profile.
        **kwargs: see :class:`~vlad.scorers.base.Scorer`. In the paper profile ``precision="auto"`` means fp32 (the
            reference keeps fp32 weights and runs the forward pass under fp16 autocast on CUDA), and the forward pass
            runs in batches of :data:`PAPER_BATCH_SIZE` whatever ``batch_size`` says.

    Use :meth:`score_many` on a batch of images of one product (tens of them, mostly normal): each image is scored
    against the others, so scores are relative to the batch and a batch of only defective parts breaks the premise.
    :meth:`score` of a single image works only after :meth:`fit` (the references join every batch).

    Maps are on the distance scale: Euclidean distances between L2-normalised features, in [0, 2], where ``d = 0.5``
    means a best match of cosine ``1 - d^2 / 2 = 0.875``. Image scores are on that scale in the vlad profile; in the
    paper profile they are the reference's batch-relative RsCIN scores (min-max normalised maxima, smoothed). The
    zero-shot default threshold 0.5 (image and pixel) with scale 0.5 is a geometric choice, not measured on any
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
        k_list: Sequence[int] | None = None,
        dataset: str | None = None,
        fraction: float = TOPMIN_FRACTION,
        chunk_elements: int | None = None,
        **kwargs: Any,
    ) -> None:
        paper = check_profile(kwargs.get("profile")) == "paper"
        if paper and kwargs.get("precision", "auto") == "auto":
            kwargs["precision"] = "fp32"
        super().__init__(backbone, **kwargs)
        self.layers = self._resolve_layers(layers)
        self.r_list = _positive_ints(r_list, "r_list", "(1, 3, 5)", odd=True)
        self.dataset = _resolve_dataset(dataset, k_list)
        self.k_list = _positive_ints(RSCIN_K_LISTS[self.dataset] if k_list is None else k_list, "k_list", "(1, 2, 3)")
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
        if chunk_elements is not None and chunk_elements < 1:
            raise ConfigError(f"chunk_elements must be >= 1, got {chunk_elements}")
        self.fraction = float(fraction)
        self._chunk_elements = None if chunk_elements is None else int(chunk_elements)
        self._batch_warning: str | None = None
        self._refs_paper: bool | None = None
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}

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

    @property
    def paper(self) -> bool:
        """Whether this scorer runs the reference's computation: the paper profile, and no concept steering."""
        return self.profile == "paper" and self.transform is None

    @property
    def chunk_elements(self) -> int:
        if self._chunk_elements is not None:
            return self._chunk_elements
        return PAPER_CHUNK_ELEMENTS if self.paper else CHUNK_ELEMENTS

    @property
    def autocast(self) -> bool:
        """Whether the paper profile's forward pass runs under fp16 autocast (the reference's
        ``torch.cuda.amp.autocast()``, models/musc.py:161, which only acts on CUDA)."""
        return self.backbone.device.startswith("cuda")

    def paper_activation(self) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The MLP activation of the reference's tower, by name and function.

        The reference builds OpenAI weights at their native size with ``load_openai_model`` (QuickGELU,
        open_clip/factory.py:184-191, model.py:336-389) and at any other size rebuilds the tower from the JSON config,
        which sets no ``quick_gelu`` for the CLIP ViTs it lists, so ``nn.GELU`` (factory.py:144-164, model.py:87).
        Other weights are built from their config in both codes: the backbone's own activation.
        """
        if self.paper_activation_source() == "openai":
            if self.image_size == self.backbone.native_size:
                return "quickgelu", _quick_gelu
            return "gelu", F.gelu
        own = self.backbone.model.visual.transformer.resblocks[0].mlp.gelu
        return type(own).__name__.lower(), own

    def paper_activation_source(self) -> str:
        """``openai`` when the backbone spec names the OpenAI weights (``...@openai``), else ``config``."""
        try:
            return "openai" if parse_spec(self.backbone.spec).pretrained == "openai" else "config"
        except BackboneError:
            return "config"

    # ------------------------------------------------------------------ subclass API
    def _extract(self, x: torch.Tensor) -> Features:
        if self.paper:
            return self._extract_paper(x)
        out = self.backbone.forward_visual(x, layers=self.layers)
        feats = {"global": self.steer(F.normalize(out.global_embedding.float(), dim=-1))}
        for layer in self.layers:
            tokens = out.patch_tokens[layer].float()
            feats[f"layer{layer}"] = tokens if self.transform is None else self.steer(F.normalize(tokens, dim=-1))
        return feats

    @torch.no_grad()
    def _extract_paper(self, x: torch.Tensor) -> Features:
        """The reference's ``encode_image`` (models/musc.py:161-176; open_clip/transformer.py:319-339, 554-614)."""
        _check_official_blocks(self.backbone)
        visual = self.backbone.model.visual
        _, act = self.paper_activation()
        grid = (x.shape[-2] // self.backbone.patch_size, x.shape[-1] // self.backbone.patch_size)
        pos = self._paper_positional_embedding(grid)  # at load time in the reference: no autocast
        x = x.to(torch.float)
        ctx = torch.autocast("cuda", dtype=torch.float16) if self.autocast else contextlib.nullcontext()
        with ctx:
            h = visual.conv1(x)
            h = h.reshape(h.shape[0], h.shape[1], -1).permute(0, 2, 1)
            cls = visual.class_embedding.to(h.dtype) + torch.zeros(
                h.shape[0], 1, h.shape[-1], dtype=h.dtype, device=h.device
            )
            h = torch.cat([cls, h], dim=1)
            h = h + pos.to(h.dtype)
            h = visual.ln_pre(visual.patch_dropout(h))
            h = h.permute(1, 0, 2)  # NLD -> LND
            tapped = {}
            for i, block in enumerate(visual.transformer.resblocks, start=1):
                h = official_block(block, h, act)
                if i in self.layers:
                    tapped[i] = h
            pooled = visual.ln_post(h.permute(1, 0, 2)[:, 0])
            image_features = pooled @ visual.proj
            image_features /= image_features.norm(dim=-1, keepdim=True)
        feats = {"global": image_features}
        for layer, tokens in tapped.items():
            feats[f"layer{layer}"] = tokens.permute(1, 0, 2)[:, 1:]  # LND -> NLD, class token dropped (_LNAMD.py:78)
        return feats

    def _extract_many(self, images: Sequence[Any]) -> Features:
        """The base class's, but in the paper profile always in the reference's batches of
        :data:`PAPER_BATCH_SIZE` (models/musc.py:141-147): a forward pass's rounding depends on its batch."""
        if not self.paper:
            return super()._extract_many(images)
        parts = []
        for start in range(0, len(images), PAPER_BATCH_SIZE):
            x = self.backbone.preprocess(images[start : start + PAPER_BATCH_SIZE], self.image_size)
            parts.append({k: v.float() for k, v in self._extract(x).items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _paper_positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The positional embedding as the reference re-grids it when it builds the model (open_clip/model.py:413-450:
        bicubic, ``align_corners=False``, no antialias, from the fp32 weights): on the compute device for OpenAI
        weights (they are loaded there first, factory.py:151-168), on the CPU for others (``load_checkpoint``)."""
        pos = self.backbone.model.visual.positional_embedding
        g_old = int(round((pos.shape[0] - 1) ** 0.5))
        if grid == (g_old, g_old):
            return pos
        if grid not in self._pos_cache:
            device = pos.device if self.paper_activation_source() == "openai" else torch.device("cpu")
            patch_pos = pos[1:].float().to(device).reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
            patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)[0]
            self._pos_cache[grid] = torch.cat([pos[:1].float().to(device), patch_pos]).to(pos.device, pos.dtype)
        return self._pos_cache[grid]

    def fit(self, references: Sequence[ImageLike]) -> MuscScorer:
        super().fit(references)
        self._refs_paper = self.paper
        return self

    def _score(self, feats: Features, object_name: str, memory: Features | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Score the images in ``feats`` against each other and the references in ``memory``.

        Returns:
            (n,) image scores (see the class docstring) and (n, gh, gw) patch maps on the distance scale.
        """
        n = feats["global"].shape[0]
        self._check_batch(n, 0 if memory is None else memory["global"].shape[0])
        if memory is not None and self._refs_paper != self.paper:
            raise ConfigError("musc: the references were extracted for the other profile path; call fit() again")
        if self.paper:
            return self._score_paper(feats, memory)
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

    def _score_paper(self, feats: Features, memory: Features | None) -> tuple[torch.Tensor, torch.Tensor]:
        """models/musc.py:183-248 on the batch (plus the references as ordinary members)."""
        n = feats["global"].shape[0]
        if memory is not None:
            feats = {k: torch.cat([v, memory[k]]) for k, v in feats.items()}
        device = feats["global"].device
        per_degree = []
        for r in self.r_list:
            z = official_lnamd([feats[f"layer{layer}"] for layer in self.layers], self.grid, r)
            per_layer = [official_msm(zl.to(device), self.fraction, self.chunk_elements).cpu() for zl in z]
            per_degree.append(torch.mean(torch.stack(per_layer), 0))
        maps = torch.mean(torch.stack(per_degree), 0).to(device)  # (M, P) float64
        m = maps.shape[0]
        up = F.interpolate(maps.view(m, 1, *self.grid), size=self.image_size, mode="bilinear", align_corners=True)
        maxima = up.cpu().numpy().reshape(m, -1).max(-1)
        cls_tokens = feats["global"].cpu().numpy().astype(np.float16 if self.autocast else np.float32)
        scores = official_rscin(maxima, cls_tokens, self.k_list)
        return torch.from_numpy(np.asarray(scores)[:n].copy()), maps[:n].reshape(n, *self.grid)

    def _to_input_resolution(self, m: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """Paper profile: the reference's bilinear ``align_corners=True`` upsampling (models/musc.py:225-226) from
        the patch grid straight to the input's size, in float64; equal to the reference's map for an input of
        ``image_size`` x ``image_size`` pixels."""
        if not self.paper:
            return super()._to_input_resolution(m, size)
        w, h = size
        up = F.interpolate(m[None, None].double(), size=(h, w), mode="bilinear", align_corners=True)[0]
        return self._smooth(up)[0].cpu().numpy().astype(np.float32)

    def _memory(self, refs: Features, keep: torch.Tensor) -> Features:
        """The kept references, as extra batch members."""
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

        Results follow the order of ``images`` and do not depend on it (up to float rounding and RsCIN ties in the
        paper profile). Besides the base fields, ``meta`` holds ``batch_score`` (the reference code's min-max
        normalised RsCIN score, relative to this batch; ``pred_score`` itself in the paper profile) and
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
        if self.paper:
            relative = [round(float(s), 6) for s in scores]
        else:
            relative = [round(v, 6) for v in _min_max_relative(scores, maps.flatten(1).amax(dim=1))]
        self._batch_warning = _small_batch_warning(members)
        if th.source == "default" and not self.few_shot:  # zero-shot, no --threshold: relative to this batch
            th = self._batch_thresholds(scores, maps)
        results = self._results(pil, scores, maps, th, timings)
        for result, rel in zip(results, relative, strict=True):
            result.meta.update({"batch_score": rel, "batch_size": members})
        return results

    def _batch_thresholds(self, scores: torch.Tensor, maps: torch.Tensor) -> Thresholds:
        """Zero-shot thresholds relative to this batch (:func:`vlad.thresholds.batch_relative`): a fixed threshold
        means nothing for batch-relative scores (at the old 0.5 every image of a batch could be flagged)."""
        from vlad.thresholds import batch_relative

        maxima = maps.flatten(1).amax(dim=1).tolist()
        th = batch_relative(scores.tolist(), maxima, min_spread=0.01 * self.default_scale)
        return th.with_sensitivity(self.sensitivity)

    def warnings(self) -> tuple[str, ...]:
        """The base warnings, the small-batch one of the latest :meth:`score_many` and profile notes."""
        extra = [self._batch_warning] if self._batch_warning else []
        if self.profile == "paper" and not self.paper:
            extra.append(
                "musc: concept steering acts on joint-space tokens, which the paper profile does not use; "
                "these scores come from the vlad profile"
            )
        elif self.paper and self.backbone.dtype != torch.float32:
            extra.append(
                f"musc paper profile on {self.backbone.dtype} weights: the reference keeps fp32 weights, so "
                "scores differ from the official code's beyond float rounding"
            )
        return super().warnings() + tuple(extra)

    def describe(self) -> dict[str, Any]:
        out = {
            **super().describe(),
            "layers": list(self.layers),
            "r_list": list(self.r_list),
            "k_list": list(self.k_list),
            "dataset": self.dataset,
            "fraction": self.fraction,
        }
        if self.paper:
            out["activation"] = self.paper_activation()[0]
        return out


def _resolve_dataset(dataset: str | None, k_list: Sequence[int] | None) -> str:
    if dataset is None:
        return "mvtec"
    key = {"mvtec_ad": "mvtec", "mvtec-ad": "mvtec"}.get(dataset.lower(), dataset.lower())
    if key not in RSCIN_K_LISTS:
        raise ConfigError(f"unknown dataset {dataset!r} for musc's RsCIN k_list; allowed: {', '.join(RSCIN_K_LISTS)}")
    if k_list is not None:
        raise ConfigError("give musc either k_list or dataset (which selects the reference's k_list), not both")
    return key


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
