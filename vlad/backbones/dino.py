"""DINOv2 patch features for Crane+'s D-Attn, through timm.

Specs: ``timm:vit_base_patch14_reg4_dinov2.lvd142m`` (the default: DINOv2 ViT-B/14 with registers, from the Hub or
its cache), ``timm:NAME@/path/model.safetensors`` (a local file), ``random:dinov2-tiny`` or ``random:NAME`` (random
weights, for tests and benchmarks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlad.errors import BackboneError, WeightsNotFoundError

DEFAULT_DINO = "timm:vit_base_patch14_reg4_dinov2.lvd142m"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class DinoPatches:
    """A timm ViT that returns patch tokens on a requested grid."""

    model: torch.nn.Module
    spec: str
    device: str = "cpu"

    @classmethod
    def from_spec(cls, spec: str, *, device: str = "cpu") -> DinoPatches:
        import timm

        if spec == "random:dinov2-tiny":
            from timm.models.vision_transformer import VisionTransformer

            model = VisionTransformer(
                img_size=112,
                patch_size=14,
                embed_dim=32,
                depth=2,
                num_heads=2,
                reg_tokens=4,
                no_embed_class=True,
                dynamic_img_size=True,
                num_classes=0,
            )
        elif spec.startswith("random:"):
            model = _create(timm, spec.removeprefix("random:"), pretrained=False)
        elif spec.startswith("timm:"):
            name, _, file = spec.removeprefix("timm:").partition("@")
            if file:
                model = _create(timm, name, pretrained=True, pretrained_cfg_overlay={"file": file})
            else:
                _check_cached(name)
                model = _create(timm, name, pretrained=True)
        else:
            raise BackboneError(f"unknown DINO spec {spec!r}; use timm:NAME, timm:NAME@/path/file, random:dinov2-tiny")
        return cls(model.eval().requires_grad_(False).to(device), spec, device)

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    @torch.no_grad()
    def patches(self, clip_input: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, gh * gw, C) patch tokens for a CLIP-normalised (B, 3, S, S) batch, run at ``grid * patch`` px."""
        dev, dt = clip_input.device, torch.float32
        raw = clip_input.float() * torch.tensor(_CLIP_STD, device=dev).view(1, 3, 1, 1)
        raw = raw + torch.tensor(_CLIP_MEAN, device=dev).view(1, 3, 1, 1)
        x = (raw - torch.tensor(_IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)) / torch.tensor(
            _IMAGENET_STD, device=dev
        ).view(1, 3, 1, 1)
        size = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        param = next(self.model.parameters())
        tokens = self.model.forward_features(x.to(param.dtype))
        return tokens[:, self.model.num_prefix_tokens :].to(dt)


def _create(timm: object, name: str, **kwargs: object) -> torch.nn.Module:
    try:
        return timm.create_model(name, dynamic_img_size=True, num_classes=0, **kwargs)  # type: ignore[attr-defined]
    except RuntimeError as exc:
        raise BackboneError(f"cannot build DINO model {name!r}: {exc}") from exc


def _check_cached(name: str) -> None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id=f"timm/{name}", filename="model.safetensors")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not (isinstance(found, str) and os.path.isfile(found)) and offline:
        raise WeightsNotFoundError(
            f"DINO weights timm/{name} are not in the Hugging Face cache and HF_HUB_OFFLINE is set; copy the cache "
            f"from a machine with network or pass --dattn timm:{name}@/path/model.safetensors"
        )
