"""FiLo (Gu et al., "FiLo: Zero-Shot Anomaly Detection by Fine-Grained Description and High-Quality Localization",
ACM MM 2024; reference code CASIA-IVA-Lab/FiLo), training-free.

- FG-Des: fine-grained defect phrases per product (``prompts/filo.yaml``; products without a list use the generic
  phrases; phrases about what a camera cannot see -- smell, sound, ... -- are dropped) become position-enhanced
  abnormal prompts "a photo of a {object} with {detail} at the {position}." over the nine 3x3 position words, plus
  the generic states ("damaged {object}", ...) at each position. Normal prompts: the WinCLIP ensemble.
- HQ-Loc: a zero-shot detector (Grounding DINO by default, see :mod:`vlad.grounding`) looks for
  "anomaly . damage . broken . defect . contamination . <details>"; boxes covering >= 70 % of the image are dropped
  (the best one is kept if none survives); the position word of the best box selects the abnormal prompts (all
  positions when there is no box), and the map is multiplied by 0.7 outside the boxes.
- Dense features: the dual-path engine with V-V attention in the last 18 blocks, layers (6, 12, 18, 24) for ViT-L/14,
  ``softmax(100 cos)`` (FiLo's temperature 0.01), maps averaged over layers, a 3x3 Gaussian (sigma 4) as FiLo.
- Image score: ``(softmax(cos(g, t) / 0.07)[a] + max map) / 2`` (FiLo's trained adapter replaced by the plain global
  embedding).
- Few-shot: as Crane (patch memory over the tapped layers, fused 50/50).

Deviations, on purpose: no trained parts. FiLo's learnable prompt contexts and its MMCI convolution head (221.8 M
parameters, about 60 % of a ViT-L/14 forward in compute) are left out: the head needs training on another dataset's
test split, and its published localisation (MVTec AUPRO 61.7) is below the training-free-plus-prompts Crane family
(84-88), so it does not earn its cost (docs/methods.md). Dense tokens pass through ``ln_post`` and ``proj`` (FiLo
feeds raw tokens to its learned heads). Grounding DINO is the public checkpoint, not one fine-tuned on anomaly boxes.
When the detector cannot be loaded, FiLo runs without HQ-Loc and every result says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vlad.backbones.clip import ClipBackbone
from vlad.errors import VladError
from vlad.resources import load_prompt_file
from vlad.result import POSITION_WORDS
from vlad.scorers._ops import gaussian_blur
from vlad.scorers.base import Features
from vlad.scorers.crane import CraneScorer

logger = logging.getLogger(__name__)

OUTSIDE_BOX_WEIGHT = 0.7
MAX_BOX_AREA = 0.7


def visual_phrases(phrases: Sequence[str], non_visual: Sequence[str]) -> list[str]:
    """Drop phrases naming what a camera cannot see (case-insensitive substring match on ``non_visual``)."""
    words = [w.lower() for w in non_visual]
    return [p for p in phrases if not any(w in p.lower() for w in words)]


def defect_phrases(object_name: str, bank: dict | None = None) -> list[str]:
    """The visual defect phrases for a product (the generic list when the product has none)."""
    bank = bank or load_prompt_file("filo")
    classes = {k.lower(): v for k, v in bank.get("classes", {}).items()}
    key = object_name.lower().strip()
    phrases = classes.get(key) or classes.get(key.replace("_", " ")) or bank["generic"]
    return visual_phrases(phrases, bank.get("non_visual_words", []))


class FiloScorer(CraneScorer):
    """FiLo: fine-grained defect descriptions and detector-guided localisation, training-free (ACM MM 2024).

    Args:
        detector: a :func:`vlad.grounding.get_detector` spec (``grounding-dino``, ``owlv2``, ``...:/local/dir``) or
            ``none``; default ``grounding-dino``.
        box_threshold: detector score threshold.
        **kwargs: see :class:`~vlad.scorers.crane.CraneScorer` (attention defaults to ``vv``, 18 refined blocks).
    """

    name = "filo"
    temperature = 0.01
    refined_blocks = 18  # V-V in the last 18 blocks (layers 7..24 of ViT-L/14)

    def __init__(
        self,
        backbone: str | ClipBackbone | None = None,
        *,
        detector: str = "grounding-dino",
        box_threshold: float = 0.25,
        attention: str = "vv",
        first_refined: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(backbone, attention=attention, first_refined=first_refined, **kwargs)  # type: ignore[arg-type]
        self.bank = load_prompt_file("filo")
        self.box_threshold = box_threshold
        self.detector_spec = detector
        self.detector, self.detector_warning = self._load_detector(detector)
        self._object_for_detector = "object"

    @staticmethod
    def _load_detector(spec: str) -> tuple[object | None, str | None]:
        if spec == "none":
            return None, None
        try:
            from vlad.grounding import get_detector

            return get_detector(spec), None
        except (VladError, ImportError) as exc:
            message = f"detector {spec!r} unavailable ({exc}); FiLo runs without HQ-Loc boxes"
            logger.warning(message)
            return None, message

    def warnings(self) -> tuple[str, ...]:
        extra = (self.detector_warning,) if self.detector_warning else ()
        return super().warnings() + extra

    # ------------------------------------------------------------------ text
    def _abnormal_prompts(self, object_name: str) -> list[list[str]]:
        """Nine lists (one per position word) of position-enhanced abnormal prompts."""
        details = defect_phrases(object_name, self.bank)
        per_position = []
        for position in POSITION_WORDS:
            prompts = [t.format(object=object_name, detail=d, position=position)
                       for t in self.bank["templates"] for d in details]  # fmt: skip
            prompts += [t.format(state=s.format(object=object_name), position=position)
                        for t in self.bank["generic_state_templates"] for s in self.bank["generic_states"]]  # fmt: skip
            prompts += [t.format(state=s.format(object_name), position=position)  # user rules' defect concepts
                        for t in self.bank["generic_state_templates"] for s in self.ensemble.extra_anomalous]  # fmt: skip
            per_position.append(prompts)
        return per_position

    def position_prototypes(self, object_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(D,) normal prototype and (10, D) abnormal prototypes: one per position word, then all positions."""
        normal, _ = self.ensemble.prompts(object_name)
        per_position = self._abnormal_prompts(object_name)
        abnormal = [self.backbone.text_prototype(p) for p in per_position]
        abnormal.append(self.backbone.text_prototype([p for ps in per_position for p in ps]))
        return self.steer(self.backbone.text_prototype(normal)), self.steer(torch.stack(abnormal))

    def _text_batch(self, feats: Features, object_name: str) -> torch.Tensor:
        if self._text_override is not None:
            return super()._text_batch(feats, object_name)
        normal, abnormal = self.position_prototypes(object_name)
        chosen = abnormal[feats["position"].long().to(abnormal.device)]  # (B, D); index 9 = all positions
        return torch.stack([normal.expand_as(chosen), chosen], dim=1).to(feats["global"].device)

    # ------------------------------------------------------------------ HQ-Loc
    def score_many(self, images, object_name: str = "object"):  # type: ignore[no-untyped-def]
        self._object_for_detector = object_name.strip() or "object"
        return super().score_many(images, object_name)

    def _extract(self, x: torch.Tensor) -> Features:
        feats = super()._extract(x)
        positions, masks = [], []
        for image in self._to_pil(x):
            position, mask = self._locate(image)
            positions.append(position)
            masks.append(mask)
        feats["position"] = torch.tensor(positions, dtype=torch.float32, device=x.device)
        feats["boxmask"] = torch.from_numpy(np.stack(masks)).to(x.device)
        return feats

    def _to_pil(self, x: torch.Tensor) -> list[Image.Image]:
        raw = (x.float() * self.backbone._std.to(x.device) + self.backbone._mean.to(x.device)).clamp(0, 1)
        arrays = (raw.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arrays]

    def _locate(self, image: Image.Image) -> tuple[int, np.ndarray]:
        """(position index, 9 = all) and an (S, S) float weight mask: 1 inside the boxes, 0.7 outside."""
        size = self.image_size
        ones = np.ones((size, size), np.float32)
        if self.detector is None:
            return len(POSITION_WORDS), ones
        from vlad.grounding import filter_boxes

        phrases = [*self.bank["detector_words"], *defect_phrases(self._object_for_detector, self.bank)]
        boxes = self.detector.detect(image, phrases, threshold=self.box_threshold)  # type: ignore[attr-defined]
        boxes = filter_boxes(boxes, max_area_fraction=MAX_BOX_AREA, image_size=image.size)
        if not boxes:
            return len(POSITION_WORDS), ones
        weights = np.full((size, size), OUTSIDE_BOX_WEIGHT, np.float32)
        for box in boxes:
            x0, y0, x1, y1 = (int(round(v)) for v in box.xyxy)
            weights[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = 1.0
        return POSITION_WORDS.index(boxes[0].position), weights

    # ------------------------------------------------------------------ maps and scores
    def _finish_maps(self, maps: torch.Tensor, feats: Features) -> torch.Tensor:
        maps = gaussian_blur(maps, 4.0, radius=1)  # FiLo: GaussianBlur(kernel 3, sigma 4)
        return maps * feats["boxmask"].to(maps.dtype)

    def _image_score(self, feats: Features, text: torch.Tensor, logits: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        glob = torch.softmax(torch.einsum("bd,bkd->bk", feats["global"], text) / 0.07, dim=-1)[:, 1]
        return (glob + maps.flatten(1).amax(dim=-1)) / 2
