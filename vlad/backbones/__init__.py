"""Backbone specs and loading. Parsing is torch-free; :func:`load_backbone` imports torch and open_clip.

Spec strings:

- ``openclip:ViT-L-14-336-quickgelu@openai`` -- an open_clip architecture and pretrained tag (the default).
- ``openclip:ViT-B-16-plus-240@laion400m_e31`` -- WinCLIP's backbone.
- ``openclip:NAME@/path/to/weights.safetensors`` -- an architecture with a local checkpoint file.
- ``openclip:local-dir:/path`` or a bare directory path -- a folder with ``open_clip_config.json`` and weights.
- ``openclip:hf-hub:org/repo`` -- an open_clip model on the Hugging Face Hub (or in its local cache).
- ``random:tiny`` / ``random:<open_clip model name>`` -- random weights, for smoke tests and speed benchmarks.
  Scores from random weights are meaningless; every result says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlad.backbones.spec import (
    _CONFIG_DIR,
    _SPEC_FORMS,
    TINY_MODEL,
    BackboneSpec,
    ensure_weights_available,
    parse_spec,
    register_tiny_config,
)
from vlad.errors import BackboneError

if TYPE_CHECKING:
    from vlad.backbones.clip import ClipBackbone

DEFAULT_BACKBONE = "openclip:ViT-L-14-336-quickgelu@openai"
WINCLIP_BACKBONE = "openclip:ViT-B-16-plus-240@laion400m_e31"
_LOADED: dict[tuple[str, str, str], ClipBackbone] = {}

__all__ = [
    "DEFAULT_BACKBONE",
    "TINY_MODEL",
    "WINCLIP_BACKBONE",
    "_CONFIG_DIR",
    "_SPEC_FORMS",
    "BackboneSpec",
    "ensure_weights_available",
    "load_backbone",
    "parse_spec",
    "register_tiny_config",
    "resolve_device",
]


def resolve_device(device: str = "auto") -> str:
    """``auto`` picks cuda, then mps, then cpu. Other values pass through after a check."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise BackboneError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    return device


def load_backbone(spec: str = DEFAULT_BACKBONE, *, device: str = "auto", precision: str = "auto") -> ClipBackbone:
    """Build (or reuse) a backbone. Loaded backbones are cached per (spec, device, precision) in this process.

    Args:
        spec: see the module docstring.
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
        precision: ``auto`` (fp16 on GPU, fp32 on CPU), ``fp32``, ``fp16`` or ``bf16``.

    Raises:
        BackboneError: bad spec, unknown model name, unsupported architecture.
        WeightsNotFoundError: weights are not on disk and cannot be downloaded.
    """
    parsed = parse_spec(spec)
    device = resolve_device(device)
    key = (parsed.spec, device, precision)
    if key not in _LOADED:
        from vlad.backbones.clip import ClipBackbone

        _LOADED[key] = ClipBackbone.from_spec(parsed, device=device, precision=precision)
    return _LOADED[key]
