"""WinCLIP and WinCLIP+ (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", CVPR 2023,
arXiv 2303.14814), after the paper and anomalib's port.

Zero-shot:
- text prototypes: the compositional ensemble in ``prompts/winclip.yaml`` (7 normal and 4 anomalous states x 22
  templates), each prompt embedding L2-normalised, averaged, renormalised;
- image score ``s = softmax([cos(g, t_n), cos(g, t_a)] / 0.07)[1]``;
- windows of 2 and 3 patches (stride 1): each window's patches plus the class token run through the whole transformer
  again and are scored like the image; each patch takes the harmonic mean of the windows covering it;
- the map is the harmonic mean over {broadcast image score, scale-2 map, scale-3 map}.

Few-shot (WinCLIP+), given normal references: visual association ``(1 - max cos(f, f_ref)) / 2`` for last-layer patch
tokens and for each window scale (window scores aggregated harmonically), averaged over the three; the map is
``(zero-shot + few-shot) / 2`` and the image score ``(s + max few-shot map) / 2``.

Deviations, on purpose:
- patch tokens for the few-shot memory are projected (``ln_post`` then ``proj``), as everywhere in vlad; anomalib
  uses the unprojected ``ln_post`` output. Both are linear images of the same tokens.
- prompt embeddings are normalised before averaging (the paper's ensemble); anomalib averages unnormalised ones.
- the map is upsampled straight to the input image's size (bilinear), not to 240 and then resized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlad.backbones import WINCLIP_BACKBONE
from vlad.backbones.clip import ClipBackbone
from vlad.errors import ConfigError
from vlad.scorers._ops import upsample
from vlad.scorers._text import PromptEnsemble
from vlad.scorers.base import Features, Scorer

TEMPERATURE = 0.07


def window_indices(grid: tuple[int, int], size: int) -> torch.Tensor:
    """(W, size * size) patch indices of every size x size window (stride 1) on a row-major grid."""
    gh, gw = grid
    if not 1 <= size <= min(gh, gw):
        raise ConfigError(f"window size {size} does not fit the {gh}x{gw} patch grid")
    rows = torch.arange(gh - size + 1)
    cols = torch.arange(gw - size + 1)
    offsets = (torch.arange(size)[:, None] * gw + torch.arange(size)[None, :]).reshape(-1)
    starts = (rows[:, None] * gw + cols[None, :]).reshape(-1)
    return starts[:, None] + offsets[None, :]


def harmonic_aggregation(window_scores: torch.Tensor, windows: torch.Tensor, n_patches: int) -> torch.Tensor:
    """(B, W) window scores -> (B, N) per-patch harmonic mean over the windows covering each patch."""
    membership = torch.zeros(windows.shape[0], n_patches, device=window_scores.device)
    membership.scatter_(1, windows.to(window_scores.device), 1.0)
    inverse = (1.0 / window_scores.clamp_min(1e-12)) @ membership
    return membership.sum(0) / inverse


def class_scores(embeddings: torch.Tensor, text: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """(..., D) normalised embeddings vs (2, D) [normal, anomalous] prototypes -> (...) anomaly probability."""
    return torch.softmax(embeddings @ text.T / temperature, dim=-1)[..., 1]


def visual_association(feats: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(B, N, D) vs (M, D) normalised -> (B, N) ``min over memory of (1 - cos) / 2``."""
    return (1.0 - (feats @ memory.T).amax(dim=-1)) / 2.0


class WinClipScorer(Scorer):
    """WinCLIP / WinCLIP+: prompt ensemble and multi-scale windows, few-shot patch memory (CVPR 2023).

    Args:
        backbone: default ``openclip:ViT-B-16-plus-240@laion400m_e31`` (WinCLIP's), input 240 px.
        scales: window sizes in patches.
        prompts: name of the prompt file in ``prompts/``.
        **kwargs: see :class:`~vlad.scorers.base.Scorer`.

    Zero-shot default threshold 0.5 on the anomaly probability (scale 1.0): the image is flagged when the anomalous
    prompts win the softmax. Few-shot thresholds are calibrated on the references.
    """

    name = "winclip"
    default_backbone = WINCLIP_BACKBONE

    def __init__(
        self,
        backbone: str | ClipBackbone | None = None,
        *,
        scales: Sequence[int] = (2, 3),
        prompts: str = "winclip",
        **kwargs: object,
    ) -> None:
        super().__init__(backbone, **kwargs)  # type: ignore[arg-type]
        if not scales:
            raise ConfigError("scales must name at least one window size, e.g. (2, 3)")
        self.scales = tuple(int(s) for s in scales)
        self._windows = {s: window_indices(self.grid, s) for s in self.scales}
        self.ensemble = PromptEnsemble(prompts)

    def prompts(self, object_name: str) -> tuple[list[str], list[str]]:
        """(normal prompts, anomalous prompts) for ``object_name``."""
        return self.ensemble.prompts(object_name)

    def text_prototypes(self, object_name: str) -> torch.Tensor:
        """(2, D) normalised [normal, anomalous] prototypes."""
        return self.steer(self.ensemble.prototypes(self.backbone, object_name))

    def _extract(self, x: torch.Tensor) -> Features:
        # few-shot patch tokens in the joint space (ln_post @ proj), where concept rules and LAFT act; anomalib keeps
        # ln_post outputs (a documented deviation of both profiles)
        out = self.backbone.forward_visual(x, layers=[-1], keep_embeddings=True)
        assert out.embeddings is not None
        feats = {
            "global": out.global_embedding,
            "patches": out.patch_tokens[self.backbone.num_layers],
        }
        for s, windows in self._windows.items():
            feats[f"win{s}"] = self.backbone.encode_windows(out.embeddings, windows)
        return {k: self.steer(F.normalize(v.float(), dim=-1)) for k, v in feats.items()}

    def _score(self, feats: Features, object_name: str, memory: Features | None) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.text_prototypes(object_name).to(feats["global"].device)
        n = self.grid[0] * self.grid[1]
        image_score = class_scores(feats["global"], text)
        maps = [image_score[:, None].expand(-1, n)]
        for s, windows in self._windows.items():
            maps.append(harmonic_aggregation(class_scores(feats[f"win{s}"], text), windows, n))
        zero_shot = len(maps) / torch.stack([1.0 / m.clamp_min(1e-12) for m in maps]).sum(0)
        if memory is None:
            return image_score, self._at_model_size(zero_shot.reshape(-1, *self.grid))
        few = [visual_association(feats["patches"], memory["patches"])]
        for s, windows in self._windows.items():
            few.append(harmonic_aggregation(visual_association(feats[f"win{s}"], memory[f"win{s}"]), windows, n))
        few_shot = torch.stack(few).mean(0)
        final = (zero_shot + few_shot) / 2
        score = (image_score + few_shot.amax(dim=-1)) / 2
        return score, self._at_model_size(final.reshape(-1, *self.grid))

    def _at_model_size(self, maps: torch.Tensor) -> torch.Tensor:
        """paper: upsample to the model input first, as anomalib does (the caller resizes again); vlad: grid maps."""
        return upsample(maps, self.image_size) if self.profile == "paper" else maps

    def _memory(self, refs: Features, keep: torch.Tensor) -> Features:
        keep = keep.to(refs["patches"].device)
        return {k: v[keep].reshape(-1, v.shape[-1]) for k, v in refs.items() if k != "global"}
