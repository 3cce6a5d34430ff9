"""Training learned adapters (``vlad train-adapter``): Crane's prompt context vectors, or LoRA on the vision tower.

Crane's recipe (METHODS.md §3.5; AlirezaSalehy/Crane ``train.py``), for ``crane-prompts``:

- Prompts ``"X ... X object."`` (normal, ``ctx_pos``) and ``"X ... X damaged object."`` (anomalous, ``ctx_neg``), 12
  learned context vectors of the text width each, drawn from N(0, 0.02); the frozen text tower runs on the embeddings
  with the ``X`` positions replaced (CoOp), exactly as open_clip's ``encode_text`` otherwise.
- Vision: the dense engine with Crane's defaults (E-Attn ``qq+kk+vv``, quarter-point layers). It is frozen, so each
  image's refined tokens and global embedding are computed once and cached (fp16 on the CPU); epochs then run only
  the text tower.
- Loss: ``L = 2 sum_layers [Focal(softmax map, gamma 2) + Dice(p_a, mask)] + 0.2 CE(cos(g', t) / 0.01, label)``, maps
  ``softmax(cos / 0.07)`` upsampled ``nearest`` to the input size; ``g'`` is the fused local-to-global image
  embedding of Crane's image score. (Crane writes the Dice input as ``(1 - p_n + p_a) / 2``, which is ``p_a``.)
- Adam, lr 1e-3, betas (0.6, 0.999), batch 8, a fixed number of epochs chosen a priori (5), seed 111; no validation
  split, no early stopping.

``lora``: peft LoRA (rank 8, alpha 16, no dropout) on the vision MLPs ``mlp.c_fc`` / ``mlp.c_proj`` (not ``attn``:
the dense engine bypasses ``nn.MultiheadAttention.forward``, see :mod:`vlad.adapters`), trained through the dense
engine with gradients, against the fixed prompt-ensemble prototypes of each sample's product name, with the same
loss and optimiser. The shared backbone is never modified: LoRA goes into a copy.

Data: a dataset's test split with masks (Crane trains on MVTec's test split to evaluate on VisA and the reverse), or
``synthetic``: each normal train image once as it is and once with a planted defect
(:func:`vlad.data.synthetic.synthesize_anomaly`, modes cycling texture / colour / dark / bright), all deterministic
given the seed.

Deviations from Crane, on purpose: no compound (deep) text prompts (4 tokens at depth 9) and no image-conditioned
context token during training ("pad_suffix"); Crane's released test script runs the static prompts, and those are
what vlad applies. The backbone trains in fp32.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlad._version import __version__
from vlad.adapters import LORA_TARGETS, METHODS, Adapter, AdapterMetadata, lora_backbone
from vlad.backbones import DEFAULT_BACKBONE, load_backbone, resolve_device
from vlad.backbones.clip import ClipBackbone
from vlad.backbones.dense import dense_forward
from vlad.backbones.prompts import encode_with_context as encode_with_context  # re-exported (older imports)
from vlad.errors import ConfigError, DatasetError, VladError
from vlad.prompt_learner import PromptLearner  # also imported from here (it lived here before)
from vlad.scorers.base import Features
from vlad.scorers.crane import CraneScorer

logger = logging.getLogger(__name__)

FOCAL_GAMMA = 2.0
SEG_WEIGHT = 2.0
CE_WEIGHT = 0.2
CE_TEMPERATURE = 0.01
ADAM_BETAS = (0.6, 0.999)
LORA_RANK = 8

# dense_forward is decorated with torch.no_grad(); LoRA training needs the same computation with gradients.
_dense_forward_with_grad = inspect.unwrap(dense_forward)


# ---------------------------------------------------------------------- losses
def focal_loss(
    probs: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA, eps: float = 1e-5
) -> torch.Tensor:
    """Mean focal loss ``-(1 - p_t)^gamma log p_t``.

    Args:
        probs: (B, C, H, W) class probabilities.
        target: (B, H, W) class indices (long).
    """
    pt = probs.gather(1, target[:, None]).squeeze(1).clamp_min(eps)
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Binary Dice loss ``1 - mean_b (2 |p m| + 1) / (|p| + |m| + 1)`` (AnomalyCLIP's ``BinaryDiceLoss``).

    Args:
        prob: (B, H, W) probabilities.
        target: (B, H, W) {0, 1} masks.
    """
    p, t = prob.flatten(1), target.flatten(1).to(prob.dtype)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1 - dice.mean()


def fused_image_embedding(sets: torch.Tensor, glob: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Crane's local-to-global embedding ``normalize(0.5 c + 0.5 g)``, ``c = normalize(sum_p w_p mean_l f_lp)``.

    Args:
        sets: (L, B, N, D) normalised patch tokens per layer.
        glob: (B, D) normalised global embeddings.
        logits: (L, B, N, 2) patch logits; ``w_p = softmax(mean_l logits_p)[a]``.

    Returns:
        (B, D) normalised.
    """
    weights = torch.softmax(logits.mean(0), dim=-1)[..., 1]
    local = F.normalize((weights[..., None] * sets.mean(0)).sum(1), dim=-1)
    return F.normalize(0.5 * local + 0.5 * glob, dim=-1)


def crane_loss(
    logits: torch.Tensor,
    sets: torch.Tensor,
    glob: torch.Tensor,
    text: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    grid: tuple[int, int],
) -> torch.Tensor:
    """Crane's training loss ``2 sum_l [Focal + Dice] + 0.2 CE``.

    Args:
        logits: (L, B, N, 2) patch logits ``cos / 0.07``, N = gh * gw.
        sets: (L, B, N, D) normalised patch tokens.
        glob: (B, D) normalised global embeddings.
        text: (B, 2, D) normalised [normal, anomalous] text features.
        masks: (B, S, S) {0, 1} ground truth.
        labels: (B,) image labels (long).
        grid: (gh, gw).

    Returns:
        () scalar loss.
    """
    n_sets, b = logits.shape[:2]
    size = tuple(masks.shape[-2:])
    maps = torch.softmax(logits, dim=-1).permute(0, 1, 3, 2).reshape(n_sets * b, 2, *grid)
    maps = F.interpolate(maps, size=size, mode="nearest").reshape(n_sets, b, 2, *size)
    target = masks.long()
    seg = sum(focal_loss(m, target) + dice_loss(m[:, 1], target) for m in maps)
    image_logits = torch.einsum("bd,bkd->bk", fused_image_embedding(sets, glob, logits), text) / CE_TEMPERATURE
    return SEG_WEIGHT * seg + CE_WEIGHT * F.cross_entropy(image_logits, labels)


def batch_loss(
    scorer: CraneScorer, feats: Features, text: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """:func:`crane_loss` of a Crane scorer's features (B, ...) against (B, 2, D) text, (B, S, S) masks, (B,) labels."""
    logits = scorer.patch_logits(feats, text)
    sets = torch.stack(scorer.token_sets(feats))
    return crane_loss(logits, sets, feats["global"], text, masks, labels, scorer.grid)


# ---------------------------------------------------------------------- data
@dataclass(frozen=True)
class TrainingItem:
    """One training image.

    Attributes:
        path: the image file.
        category: its dataset category (prompts use :func:`vlad.data.prompt_name` of it).
        label: 0 normal, 1 anomalous.
        mask_path: the ground-truth mask (anomalous dataset images).
        synthetic: for planted defects, the index that seeds (and picks the mode of) the defect; else None.
    """

    path: Path
    category: str
    label: int
    mask_path: Path | None = None
    synthetic: int | None = None


def build_items(
    root: str | Path,
    layout: str,
    categories: Sequence[str] | None = None,
    *,
    synthetic: bool = False,
    limit: int | None = None,
    seed: int = 0,
) -> list[TrainingItem]:
    """The training images: the test split with masks, or (``synthetic``) normal train images plus planted defects.

    ``limit`` keeps a seeded random subset of at most that many dataset images (before planting defects).

    Raises:
        DatasetError: no usable images, or (masked data) no anomalous image with a mask.
    """
    from vlad.data import load_dataset

    samples = load_dataset(root, layout, categories, split="train" if synthetic else "test")
    if synthetic:
        samples = [s for s in samples if s.label == 0]
    else:
        unmasked = sum(1 for s in samples if s.label == 1 and s.mask_path is None)
        if unmasked:
            logger.warning("skipping %d anomalous image(s) without a mask in %s", unmasked, root)
        samples = [s for s in samples if s.label == 0 or s.mask_path is not None]
    if limit is not None and len(samples) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(samples), limit, replace=False))
        samples = [samples[i] for i in keep]
    if synthetic:
        pairs = [
            (TrainingItem(s.path, s.category, 0), TrainingItem(s.path, s.category, 1, synthetic=i))
            for i, s in enumerate(samples)
        ]
        return [item for pair in pairs for item in pair]
    if not any(s.label == 1 for s in samples):
        raise DatasetError(
            f"no anomalous images with masks in {root} ({layout} layout); use --synthetic to plant "
            f"defects in normal images instead"
        )
    return [TrainingItem(s.path, s.category, s.label, s.mask_path) for s in samples]


def load_item(item: TrainingItem, size: int, seed: int) -> tuple[Image.Image, np.ndarray]:
    """The image and its (size, size) bool mask; a synthetic defect is planted after resizing to size x size."""
    from vlad.data import ANOMALY_MODES, load_image, load_mask, synthesize_anomaly

    image = load_image(item.path)
    if item.synthetic is not None:
        base = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))
        rng = np.random.default_rng([seed, item.synthetic])
        bad, mask = synthesize_anomaly(base, rng, mode=ANOMALY_MODES[item.synthetic % len(ANOMALY_MODES)])
        return Image.fromarray(bad), mask
    if item.mask_path is None:
        return image, np.zeros((size, size), bool)
    return image, load_mask(item.mask_path, size=(size, size))


def load_batch(
    items: Sequence[TrainingItem], size: int, seed: int
) -> tuple[list[Image.Image], torch.Tensor, torch.Tensor]:
    """Images, (B, size, size) bool masks and (B,) long labels."""
    loaded = [load_item(item, size, seed) for item in items]
    masks = torch.from_numpy(np.stack([m for _, m in loaded]))
    labels = torch.tensor([item.label for item in items], dtype=torch.long)
    return [im for im, _ in loaded], masks, labels


# ---------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """What ``vlad train-adapter`` trains on and how (defaults: Crane's schedule).

    Attributes:
        method: ``crane-prompts`` or ``lora``.
        root: dataset root.
        layout: ``mvtec``, ``visa`` or ``folder``.
        categories: categories to train on (None: all).
        synthetic: plant defects in normal train images instead of using the test split's masks.
        epochs: epochs, fixed a priori.
        lr: Adam learning rate.
        batch_size: images per step.
        n_ctx: learned context tokens per prompt (crane-prompts).
        lora_rank: LoRA rank (alpha = 2 * rank).
        image_size: input side; default the Crane scorer's (518 for ViT-L/14@336).
        seed: seed for initialisation, shuffling, subsets and planted defects.
        limit: at most this many dataset images.
    """

    method: str
    root: str | Path
    layout: str
    categories: Sequence[str] | None = None
    synthetic: bool = False
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 8
    n_ctx: int = 12
    lora_rank: int = LORA_RANK
    image_size: int | None = None
    seed: int = 111
    limit: int | None = None

    def check(self) -> None:
        """Raise ConfigError naming the first bad option."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown adapter method {self.method!r}; allowed: {', '.join(METHODS)}")
        for name in ("epochs", "batch_size", "n_ctx", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr!r}")
        bad_limit = isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        if self.limit is not None and bad_limit:
            raise ConfigError(f"limit must be a positive integer or None, got {self.limit!r}")


# ---------------------------------------------------------------------- training
ProgressFn = Callable[[int, float], None]


def run_epochs(
    n: int,
    step: Callable[[torch.Tensor], torch.Tensor],
    params: Sequence[nn.Parameter],
    config: TrainConfig,
    progress: ProgressFn | None = None,
) -> list[float]:
    """Adam over ``config.epochs`` seeded shuffles of ``n`` samples; ``step(indices)`` returns the batch loss.

    Returns:
        The mean loss of each epoch.

    Raises:
        VladError: the loss became NaN or infinite.
    """
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=ADAM_BETAS)
    shuffle = torch.Generator().manual_seed(config.seed)
    history: list[float] = []
    for epoch in range(1, config.epochs + 1):
        order, total = torch.randperm(n, generator=shuffle), 0.0
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            loss = step(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / n)
        if not math.isfinite(history[-1]):
            raise VladError(f"training diverged: the loss is {history[-1]} in epoch {epoch}; lower --lr")
        logger.info("epoch %d/%d: mean loss %.5f", epoch, config.epochs, history[-1])
        if progress is not None:
            progress(epoch, history[-1])
    return history


def cache_features(
    scorer: CraneScorer, items: Sequence[TrainingItem], config: TrainConfig
) -> tuple[Features, torch.Tensor, torch.Tensor]:
    """The frozen vision features of every item, once: ``{layerL: (n, N, D), global: (n, D)}`` (fp16, CPU), the
    (n, S, S) bool masks and (n,) labels."""
    parts: list[Features] = []
    masks, labels = [], []
    for start in range(0, len(items), config.batch_size):
        images, m, y = load_batch(items[start : start + config.batch_size], scorer.image_size, config.seed)
        with torch.no_grad():
            feats = scorer.features(scorer.backbone.preprocess(images, scorer.image_size))
        parts.append({k: v.to("cpu", torch.float16) for k, v in feats.items()})
        masks.append(m)
        labels.append(y)
    cache = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    size = sum(v.numel() * v.element_size() for v in cache.values())
    logger.info("cached the vision features of %d images (%.1f MiB)", len(items), size / 2**20)
    return cache, torch.cat(masks), torch.cat(labels)


def extract_with_grad(scorer: CraneScorer, x: torch.Tensor) -> Features:
    """:meth:`CraneScorer._extract` with gradients (for LoRA): normalised ``layerL`` (B, N, D) and ``global`` (B, D)."""
    out = _dense_forward_with_grad(
        scorer.backbone, x, scorer.layers, attention=scorer.attention, first_refined=scorer.first_refined
    )
    feats = {f"layer{layer}": F.normalize(tok.float(), dim=-1) for layer, tok in out.refined.items()}
    feats["global"] = F.normalize(out.global_embedding.float(), dim=-1)
    return feats


def _train_prompts(
    base: ClipBackbone, items: list[TrainingItem], config: TrainConfig, progress: ProgressFn | None
) -> tuple[dict[str, torch.Tensor], list[float], CraneScorer, dict[str, Any]]:
    scorer = CraneScorer(base, image_size=config.image_size, object_agnostic=True)
    learner = PromptLearner(base, config.n_ctx, seed=config.seed)
    cache, masks, labels = cache_features(scorer, items, config)
    device = base.device

    def step(idx: torch.Tensor) -> torch.Tensor:
        feats = {k: v[idx].to(device).float() for k, v in cache.items()}
        text = learner().expand(len(idx), -1, -1)
        return batch_loss(scorer, feats, text, masks[idx].to(device), labels[idx].to(device))

    history = run_epochs(len(items), step, [learner.ctx_pos, learner.ctx_neg], config, progress)
    extra = {"n_ctx": config.n_ctx, "prompts": {"normal": learner.templates[0], "anomalous": learner.templates[1]}}
    return learner.state_tensors(), history, scorer, extra


def _train_lora(
    base: ClipBackbone, items: list[TrainingItem], config: TrainConfig, progress: ProgressFn | None
) -> tuple[dict[str, torch.Tensor], list[float], CraneScorer, dict[str, Any]]:
    from peft import get_peft_model_state_dict

    from vlad.data import prompt_name

    lora = {"r": config.lora_rank, "alpha": 2 * config.lora_rank, "dropout": 0.0, "target_modules": LORA_TARGETS}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        backbone = lora_backbone(base, lora)  # a copy: the shared base stays untouched
    params = [p for name, p in backbone.model.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    scorer = CraneScorer(backbone, image_size=config.image_size)
    prototypes = {c: scorer.text_prototypes(prompt_name(c)) for c in sorted({it.category for it in items})}

    def step(idx: torch.Tensor) -> torch.Tensor:
        batch = [items[i] for i in idx.tolist()]
        images, masks, labels = load_batch(batch, scorer.image_size, config.seed)
        feats = extract_with_grad(scorer, backbone.preprocess(images, scorer.image_size))
        text = torch.stack([prototypes[it.category] for it in batch])
        return batch_loss(scorer, feats, text, masks.to(backbone.device), labels.to(backbone.device))

    history = run_epochs(len(items), step, params, config, progress)
    tensors = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(backbone.model).items()}
    return tensors, history, scorer, {"lora": lora, "prompts": {"ensemble": scorer.ensemble.name}}


def train_adapter(
    config: TrainConfig,
    backbone: str | ClipBackbone = DEFAULT_BACKBONE,
    *,
    device: str = "auto",
    progress: ProgressFn | None = None,
) -> Adapter:
    """Train an adapter; ``progress(epoch, mean loss)`` is called after each epoch. Save it with
    :func:`vlad.adapters.save_adapter`.

    Args:
        config: what and how to train.
        backbone: a spec (loaded in fp32 on ``device``) or a loaded backbone (never modified).
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
        progress: optional per-epoch callback.

    Raises:
        ConfigError: bad options; DatasetError: bad data; BackboneError: unusable backbone.
    """
    config.check()
    if config.method == "lora":
        from vlad.adapters import require_peft

        require_peft()
    if not isinstance(backbone, ClipBackbone):
        device = resolve_device(device)  # fp32 for training; on the CPU "auto" is fp32 and shares the cached model
        backbone = load_backbone(backbone, device=device, precision="auto" if device == "cpu" else "fp32")
    items = build_items(
        config.root, config.layout, config.categories, synthetic=config.synthetic, limit=config.limit, seed=config.seed
    )
    logger.info("training %s on %d images (%d anomalous)", config.method, len(items), sum(it.label for it in items))
    trainer = _train_prompts if config.method == "crane-prompts" else _train_lora
    tensors, history, scorer, extra = trainer(backbone, items, config, progress)
    return Adapter(_metadata(config, scorer, items, history, extra), tensors)


def _metadata(
    config: TrainConfig, scorer: CraneScorer, items: list[TrainingItem], history: list[float], extra: dict[str, Any]
) -> AdapterMetadata:
    data = {
        "root": str(Path(config.root).resolve()),
        "layout": config.layout,
        "categories": sorted({it.category for it in items}),
        "split": "train" if config.synthetic else "test",
        "synthetic": config.synthetic,
        "images": len(items),
        "anomalous": sum(it.label for it in items),
        "limit": config.limit,
    }
    return AdapterMetadata(
        method=config.method,
        backbone=scorer.backbone.spec,
        layers=tuple(scorer.layers),
        attention=scorer.attention,
        first_refined=scorer.first_refined,
        image_size=scorer.image_size,
        prompts=extra["prompts"],
        training_data=data,
        epochs=config.epochs,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        n_ctx=extra.get("n_ctx"),
        lora=extra.get("lora"),
        seed=config.seed,
        lr=float(config.lr),
        batch_size=config.batch_size,
        loss_history=tuple(history),
        vlad_version=__version__,
    )
