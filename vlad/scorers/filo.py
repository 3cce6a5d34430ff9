"""FiLo (Gu et al., "FiLo: Zero-Shot Anomaly Detection by Fine-Grained Description and High-Quality Localization",
ACM MM 2024; reference code CASIA-IVA-Lab/FiLo), training-free. docs/methods.md lists every step against the
reference ``test.py`` and ``models/FiLo.py`` with file and line.

- FG-Des: fine-grained defect phrases per *kind of object* (``prompts/filo.yaml`` via :mod:`vlad.finegrained`:
  ``metal_nut``, ``pcb3`` and other dataset spellings are normalised; an unknown product gets the generic list and its
  results say so). They are written without the benchmarks' defect names: FiLo's own lists are per benchmark class
  and partly copy VisA's test labels. Phrases about what a camera cannot see are dropped.
- Position-enhanced abnormal prompts over the nine 3x3 position words, plus the generic states at each position.
  ``paper``: FiLo's wording without its learned context, "abnormal {object} with {detail} at {position}." and
  "{state} at {position}.", normal prompts the seven WinCLIP normal states. ``vlad``: "a photo of a {object} with
  {detail} at the {position}." (three templates), normal prompts the full WinCLIP ensemble.
- HQ-Loc: a zero-shot detector (Grounding DINO tiny by default, see :mod:`vlad.grounding`) reads
  "anomaly . damage . broken . defect . contamination . <details>".
  ``paper`` (test.py:239-249, 450, 574-641): boxes above ``box_threshold`` (``text_threshold`` is set to it) with
  less than 70 % of the image area; when none is left, the single highest-scoring box; boxes whose phrase holds no
  detail or general word are dropped; the best remaining box's centre picks the position on FiLo's 518 px table
  ("center" when there is no box, all positions when the centre falls between cells); the map is multiplied by 0.7
  outside the boxes, everywhere when there is none. ``vlad``: the same area filter, the best box's 3x3 position word,
  all positions and no down-weighting when there is no box.
- Dense features: the dual-path engine with V-V attention in the last 18 blocks, through ``ln_post`` and ``proj``
  (FiLo's trained heads, the MMCI convolutions and linear layers, cannot be shipped; without them its original-path
  token sets are left out). ``paper``: the last block's refined stream, which is what all of FiLo's V-V sets hold
  (they are views of one tensor updated in place); ``vlad``: refined layers 12, 18 and 24, copied per layer.
- Map. ``paper``: the [normal, abnormal] pair is divided by its Frobenius norm and the logits are ``100 cos`` with it
  (``100 cos / sqrt 2``), upsampled bilinearly (``align_corners=True``) before the softmax, each set blurred with
  ``GaussianBlur(3, sigma 4)`` (torch ``reflect`` borders), then averaged. ``vlad``: ``softmax(100 cos)`` on the
  patch grid, averaged over layers, upsampled (``align_corners=False``), one 3x3 Gaussian with scipy borders.
- Image score. ``paper`` (test.py:629): ``(cos(g, t_a) / sqrt 2 + max map) / 2`` with the map before the box
  weighting; FiLo's trained adapter on ``g`` is left out (the identity: its residual branch at zero). ``vlad``:
  ``(softmax(cos(g, t) / 0.07)[a] + max map) / 2`` with the weighted map.
- Few-shot (vlad's addition in both profiles): Crane's patch memory, fused 50/50 with the zero-shot map.

Not shipped: FiLo's learnable prompt contexts, its MMCI head (221.8 M parameters, trained on another dataset's test
split; published MVTec AUPRO 61.7, below the training-free Crane family), its adapter, and its Grounding DINO
fine-tuned on the other dataset's anomaly boxes (the public checkpoint is used). When the detector cannot be loaded,
FiLo runs without HQ-Loc (all positions, no down-weighting) and every result says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlad.backbones.clip import ClipBackbone
from vlad.errors import VladError
from vlad.finegrained import GENERIC, generic_note, kind_phrases, visual_phrases
from vlad.resources import load_prompt_file
from vlad.result import POSITION_WORDS
from vlad.scorers._ops import gaussian_blur, min_cosine_distance
from vlad.scorers.base import Features
from vlad.scorers.crane import CraneScorer
from vlad.thresholds import Thresholds

logger = logging.getLogger(__name__)

__all__ = ["FiloScorer", "defect_phrases", "paper_boxes", "paper_position", "paper_weighting", "visual_phrases"]

OUTSIDE_BOX_WEIGHT = 0.7
MAX_BOX_AREA = 0.7
ALL_POSITIONS = len(POSITION_WORDS)  # index of the all-positions prototype
PAPER_SIZE = 518  # FiLo's location table is written in pixels of its 518 px input (test.py:148-156)
PAPER_CELLS = ((0, 172), (173, 344), (345, 517))  # per axis; a centre between two ranges falls in no cell
PAPER_DEFAULT_CENTRE = (259.0, 259.0)  # test.py:610


def defect_phrases(object_name: str, bank: dict | None = None) -> list[str]:
    """The visual defect phrases for a product: its kind's list (the generic list when it has no kind)."""
    return kind_phrases(bank or load_prompt_file("filo"), object_name)[0]


def paper_boxes(boxes: Sequence, words: Sequence[str], image_size: tuple[int, int]) -> list:
    """FiLo's box selection (test.py:239-249 and 574-594) on boxes already above the box threshold.

    Boxes with at least ``MAX_BOX_AREA`` of the image are dropped; when none is left, the single highest-scoring box
    (arg-max over all queries) is kept whatever its area. A box whose phrase contains none of ``words`` (the details
    and the general words) is then dropped. The arg-max over all queries equals the arg-max over the boxes above the
    threshold whenever there is one; when there is none, FiLo's arg-max box scores under ``text_threshold`` (=
    ``box_threshold``), so its phrase is empty and the phrase filter drops it: thresholded boxes are all it needs.
    """
    width, height = image_size
    kept = [b for b in boxes if b.area / (width * height) < MAX_BOX_AREA]
    if not kept and boxes:
        kept = [max(boxes, key=lambda b: b.score)]  # torch.argmax: the first of equal scores
    lowered = [w.lower() for w in words]
    return [b for b in kept if any(w in b.phrase.lower() for w in lowered)]


def paper_position(boxes: Sequence, image_size: int) -> int:
    """Index into POSITION_WORDS (or ALL_POSITIONS) picked as test.py:597-614 does: the centre of the highest-scoring
    box (the last one among equal scores), "center" when there is no box, on FiLo's 518 px table (centres are scaled
    to it); a centre in the one-pixel gaps between its cells matches no cell and FiLo then uses all positions."""
    best = None
    for box in boxes:
        if best is None or box.score >= best.score:
            best = box
    if best is None:
        cx, cy = PAPER_DEFAULT_CENTRE
    else:
        scale = PAPER_SIZE / image_size
        cx, cy = best.center[0] * scale, best.center[1] * scale
    col = next((i for i, (lo, hi) in enumerate(PAPER_CELLS) if lo <= cx <= hi), None)
    row = next((i for i, (lo, hi) in enumerate(PAPER_CELLS) if lo <= cy <= hi), None)
    return ALL_POSITIONS if col is None or row is None else 3 * row + col


def paper_weighting(maps: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """test.py:633-641: the map is marked with the value 1 inside the boxes, then every pixel not equal to 1 is
    multiplied by 0.7 -- so a pixel outside the boxes whose value is exactly 1 keeps it too. (After the 3x3 blur a
    float32 map stays below 1, at most 0.99999988, so in practice every pixel outside the boxes is down-weighted.)"""
    return torch.where(inside | (maps == 1.0), maps, maps * OUTSIDE_BOX_WEIGHT)


class FiloScorer(CraneScorer):
    """FiLo: fine-grained defect descriptions and detector-guided localisation, training-free (ACM MM 2024).

    Args:
        detector: a :func:`vlad.grounding.get_detector` spec (``grounding-dino``, ``owlv2``, ``...:/local/dir``) or
            ``none``; default ``grounding-dino``.
        box_threshold: detector score threshold (the paper profile also uses it as Grounding DINO's text threshold).
        **kwargs: see :class:`~vlad.scorers.crane.CraneScorer` (attention defaults to ``vv``, 18 refined blocks) and
            :class:`~vlad.scorers.base.Scorer` (``profile``).
    """

    name = "filo"
    checkpoint_format = None  # FiLo's released prompt learner needs its trained heads: not importable
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
        if self.profile == "paper" and not kwargs.get("layers"):
            # FiLo's stored V-V tokens (and its layer-6 tokens) are views of one tensor updated in place, so every
            # V-V set it reads is the last block's refined stream (METHODS.md 3.6, "Aliasing")
            self.layers = (self.backbone.num_layers,)
        self.bank = load_prompt_file("filo")
        self.box_threshold = box_threshold
        self.detector_spec = detector
        self.detector, self.detector_warning = self._load_detector(detector)
        self._object_for_detector = "object"
        self._phrase_warning: str | None = None
        self._warned_generic: set[str] = set()

    def _load_detector(self, spec: str) -> tuple[object | None, str | None]:
        if spec == "none":
            return None, None
        options = {}
        if self.profile == "paper" and spec.split(":", 1)[0] == "grounding-dino":
            options["text_threshold"] = self.box_threshold  # test.py:450: text_threshold = args.box_threshold
        try:
            from vlad.grounding import get_detector

            return get_detector(spec, **options), None
        except (VladError, ImportError) as exc:
            message = f"detector {spec!r} unavailable ({exc}); FiLo runs without HQ-Loc boxes"
            logger.warning(message)
            return None, message

    def warnings(self) -> tuple[str, ...]:
        extra = tuple(w for w in (self.detector_warning, self._phrase_warning) if w)
        return super().warnings() + extra

    # ------------------------------------------------------------------ text
    def prompt_phrases(self, object_name: str) -> list[str]:
        """Everything FiLo writes into prompts and the detector caption for ``object_name``: normal and generic
        states, user-added phrases, the general detector words and the defect phrases."""
        states = [s.format(object=object_name) for s in self.bank["generic_states"]]
        return [
            *super().prompt_phrases(object_name),
            *states,
            *self.bank["detector_words"],
            *defect_phrases(object_name, self.bank),
        ]

    def _abnormal_prompts(self, object_name: str) -> list[list[str]]:
        """Nine lists (one per position word) of position-enhanced abnormal prompts."""
        details = defect_phrases(object_name, self.bank)
        paper = self.profile == "paper"
        templates = self.bank["paper_templates"] if paper else self.bank["templates"]
        state_templates = [self.bank["paper_state_template"]] if paper else self.bank["generic_state_templates"]
        per_position = []
        for position in POSITION_WORDS:
            prompts = [t.format(object=object_name, detail=d, position=position) for t in templates for d in details]
            prompts += [
                t.format(state=s.format(object=object_name), position=position)
                for t in state_templates
                for s in self.bank["generic_states"]
            ]
            prompts += [
                t.format(state=s.format(object_name), position=position)  # user rules' defect concepts
                for t in state_templates
                for s in self.ensemble.extra_anomalous
            ]
            per_position.append(prompts)
        return per_position

    def _normal_prompts(self, object_name: str) -> list[str]:
        if self.profile == "paper":  # FiLo.py:195-197: the normal states alone (after the learned context)
            return self.ensemble.states(object_name)[0]
        return self.ensemble.prompts(object_name)[0]

    def position_prototypes(self, object_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(D,) normal prototype and (10, D) abnormal prototypes: one per position word, then all positions."""
        normal = self._normal_prompts(object_name)
        per_position = self._abnormal_prompts(object_name)
        abnormal = [self.backbone.text_prototype(p) for p in per_position]
        abnormal.append(self.backbone.text_prototype([p for ps in per_position for p in ps]))
        return self.steer(self.backbone.text_prototype(normal)), self.steer(torch.stack(abnormal))

    def _text_batch(self, feats: Features, object_name: str) -> torch.Tensor:
        if self._text_override is not None:
            text = super()._text_batch(feats, object_name)
        else:
            normal, abnormal = self.position_prototypes(object_name)
            chosen = abnormal[feats["position"].long().to(abnormal.device)]  # (B, D); index 9 = all positions
            text = torch.stack([normal.expand_as(chosen), chosen], dim=1).to(feats["global"].device)
        if self.profile == "paper":  # FiLo.py:666: the pair divided by its Frobenius norm (each vector 1 / sqrt 2)
            text = text / text.flatten(1).norm(dim=-1)[:, None, None]
        return text

    # ------------------------------------------------------------------ HQ-Loc
    def thresholds(self, object_name: str, *, tiled: bool = False) -> Thresholds:
        """The thresholds for ``object_name`` (see the base class); scoring a product starts here, so this also
        names the product for the detector's caption and notes when it gets the generic defect phrases."""
        name = object_name.strip() or "object"
        self._object_for_detector = name
        self._phrase_warning = None
        if kind_phrases(self.bank, name)[1] == GENERIC:
            self._phrase_warning = generic_note(name)
            if name not in self._warned_generic:
                self._warned_generic.add(name)
                logger.warning(self._phrase_warning)
        return super().thresholds(object_name, tiled=tiled)

    @classmethod
    def export_refusal(cls, options: dict) -> str | None:
        if options.get("detector", "grounding-dino") != "none":
            return (
                "filo's HQ-Loc step runs a zero-shot object detector on every image, outside the CLIP graph; "
                "export FiLo without it: --detector none"
            )
        return super().export_refusal(options)

    def _extract(self, x: torch.Tensor) -> Features:
        feats = super()._extract(x)
        if self.detector is None:  # no HQ-Loc: all positions, no box weights (tensor ops only, so it exports)
            b, size = x.shape[0], self.image_size
            feats["position"] = torch.full((b,), float(ALL_POSITIONS), device=x.device)
            feats["boxmask"] = torch.ones(b, size, size, device=x.device)
            return feats
        positions, masks = [], []
        for image in self._to_pil(x):
            position, mask = self._locate(image)
            positions.append(position)
            masks.append(mask)
        feats["position"] = torch.tensor(positions, dtype=torch.float32, device=x.device)
        feats["boxmask"] = torch.from_numpy(np.stack(masks)).to(x.device)
        return feats

    def _to_pil(self, x: torch.Tensor) -> list[Image.Image]:
        raw = self.backbone.denormalize(x)
        arrays = (raw.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arrays]

    def _locate(self, image: Image.Image) -> tuple[int, np.ndarray]:
        """(position index, 9 = all) and an (S, S) float weight mask: 1 inside the boxes, 0.7 outside."""
        size = self.image_size
        if self.detector is None:  # no HQ-Loc at all (both profiles)
            return ALL_POSITIONS, np.ones((size, size), np.float32)
        details = defect_phrases(self._object_for_detector, self.bank)
        phrases = [*self.bank["detector_words"], *details]  # test.py:562
        boxes = self.detector.detect(image, phrases, threshold=self.box_threshold)  # type: ignore[attr-defined]
        if self.profile == "paper":
            return self._locate_paper(boxes, [*details, *self.bank["detector_words"]], image.size)
        from vlad.grounding import filter_boxes

        boxes = filter_boxes(boxes, max_area_fraction=MAX_BOX_AREA, image_size=image.size)
        if not boxes:
            return ALL_POSITIONS, np.ones((size, size), np.float32)
        weights = np.full((size, size), OUTSIDE_BOX_WEIGHT, np.float32)
        for box in boxes:
            x0, y0, x1, y1 = (int(round(v)) for v in box.xyxy)
            weights[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = 1.0
        return POSITION_WORDS.index(boxes[0].position), weights

    def _locate_paper(self, boxes: Sequence, words: list[str], image_size: tuple[int, int]) -> tuple[int, np.ndarray]:
        kept = paper_boxes(boxes, words, image_size)
        size = self.image_size
        weights = np.full((size, size), OUTSIDE_BOX_WEIGHT, np.float32)  # no box: 0.7 everywhere (test.py:641)
        for box in kept:
            x0, y0, x1, y1 = (int(v) for v in box.xyxy)  # test.py:635-639 truncates
            weights[y0:y1, x0:x1] = 1.0
        return paper_position(kept, size), weights

    # ------------------------------------------------------------------ maps and scores
    def _score(self, feats: Features, object_name: str, memory: Features | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.profile != "paper":
            return super()._score(feats, object_name, memory)
        text = self._text_batch(feats, object_name)  # Frobenius-normalised pair
        logits = self.patch_logits(feats, text)  # (L, B, N, 2): 100 cos with the 1/sqrt 2 text (FiLo.py:684-686)
        n_sets, batch = logits.shape[:2]
        size = self.image_size
        grid = logits.reshape(n_sets * batch, *self.grid, 2).permute(0, 3, 1, 2)
        up = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)  # FiLo.py:690-695
        probs = torch.softmax(up, dim=1)[:, 1]  # FiLo.py:696; test.py:622 (p_a - p_n + 1) / 2 = p_a
        if memory is not None:  # vlad's few-shot addition: the patch memory's map, fused 50/50 before the blur
            few = torch.stack([min_cosine_distance(f, memory[k]) / 2 for k, f in self._memory_pairs(feats)]).mean(0)
            few_up = F.interpolate(
                few.reshape(batch, 1, *self.grid), size=(size, size), mode="bilinear", align_corners=True
            )[:, 0]
            probs = (probs.reshape(n_sets, batch, size, size) + few_up) / 2
        blurred = gaussian_blur(probs.reshape(-1, size, size), 4.0, radius=1, border="reflect")  # test.py:506, 621
        maps = blurred.reshape(n_sets, batch, size, size).mean(0)  # test.py:625-627
        glob = torch.einsum("bd,bd->b", feats["global"], text[:, 1])  # FiLo.py:668: cos / sqrt 2, no softmax
        score = (glob + maps.flatten(1).amax(dim=-1)) / 2  # test.py:629: the map before the box weighting
        if memory is not None:
            score = (score + few.amax(dim=-1)) / 2
        return score, paper_weighting(maps, feats["boxmask"].to(maps.dtype) == 1.0)

    def _finish_maps(self, maps: torch.Tensor, feats: Features) -> torch.Tensor:
        """vlad profile: a 3x3 Gaussian (sigma 4, scipy borders), then the box weights."""
        maps = gaussian_blur(maps, 4.0, radius=1)
        return maps * feats["boxmask"].to(maps.dtype)

    def _image_score(
        self, feats: Features, text: torch.Tensor, logits: torch.Tensor, maps: torch.Tensor
    ) -> torch.Tensor:
        """vlad profile: ``(softmax(cos(g, t) / 0.07)[a] + max of the weighted map) / 2``."""
        glob = torch.softmax(torch.einsum("bd,bkd->bk", feats["global"], text) / 0.07, dim=-1)[:, 1]
        return (glob + maps.flatten(1).amax(dim=-1)) / 2
