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

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vlad.errors import BackboneError, WeightsNotFoundError

if TYPE_CHECKING:
    from vlad.backbones.clip import ClipBackbone

DEFAULT_BACKBONE = "openclip:ViT-L-14-336-quickgelu@openai"
WINCLIP_BACKBONE = "openclip:ViT-B-16-plus-240@laion400m_e31"
TINY_MODEL = "vlad-tiny"
_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_SPEC_FORMS = (
    "openclip:NAME@TAG, openclip:NAME@/path/weights.safetensors, openclip:local-dir:/path, "
    "openclip:hf-hub:org/repo, a directory path, random:tiny or random:NAME"
)
_LOADED: dict[tuple[str, str, str], ClipBackbone] = {}


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed backbone spec.

    Attributes:
        spec: the string as given (normalised).
        model: open_clip model name, or ``local-dir:...`` / ``hf-hub:...``.
        pretrained: a tag, a checkpoint path, or None (random weights or weights inside the folder).
        random: True when the weights are random.
    """

    spec: str
    model: str
    pretrained: str | None
    random: bool


def parse_spec(spec: str) -> BackboneSpec:
    """Parse a backbone spec string without importing torch.

    Raises:
        BackboneError: the spec has none of the accepted forms.
    """
    spec = spec.strip()
    if not spec:
        raise BackboneError(f"empty backbone spec; use one of: {_SPEC_FORMS}")
    if spec.startswith("random:"):
        name = spec.removeprefix("random:").strip()
        if not name:
            raise BackboneError("'random:' needs a model name, e.g. random:tiny or random:ViT-B-16-plus-240")
        return BackboneSpec(spec, TINY_MODEL if name == "tiny" else name, None, True)
    if spec.startswith("openclip:"):
        body = spec.removeprefix("openclip:")
        if body.startswith(("local-dir:", "hf-hub:")):
            if not body.split(":", 1)[1]:
                raise BackboneError(f"backbone spec {spec!r} has an empty path or repo")
            return BackboneSpec(spec, body, None, False)
        name, sep, pretrained = body.partition("@")
        if not name or (sep and not pretrained):
            raise BackboneError(f"backbone spec {spec!r} must look like openclip:NAME@TAG; accepted: {_SPEC_FORMS}")
        return BackboneSpec(spec, name, pretrained or None, False)
    path = Path(spec).expanduser()
    if path.is_dir():
        return BackboneSpec(spec, f"local-dir:{path}", None, False)
    if path.is_file():
        raise BackboneError(
            f"{spec} is a checkpoint file; name its architecture too, e.g. openclip:ViT-L-14-336-quickgelu@{spec}"
        )
    raise BackboneError(f"unknown backbone spec {spec!r}; accepted: {_SPEC_FORMS}")


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


def register_tiny_config() -> None:
    """Make the bundled ``vlad-tiny`` architecture known to open_clip (idempotent)."""
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR / f"{TINY_MODEL}.json")


def ensure_weights_available(model: str, tag: str) -> None:
    """Fail fast, with instructions, when a pretrained tag's weights are neither cached nor downloadable.

    open_clip would otherwise retry the Hub for tens of seconds before a generic error.
    """
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model, tag)
    if not cfg or cfg.get("file") or _weights_cached(cfg):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not _network_reachable(cfg):
        why = "HF_HUB_OFFLINE is set" if offline else "the network is not reachable"
        raise WeightsNotFoundError(
            f"weights for {model}@{tag} are not on this machine and {why}. Supply them locally: download once "
            f"where there is network (python -c \"import open_clip; open_clip.create_model('{model}', "
            f"pretrained='{tag}')\") and copy the Hugging Face cache (~/.cache/huggingface) here, or pass "
            f"--backbone openclip:{model}@/path/to/open_clip_model.safetensors, or "
            f"--backbone openclip:local-dir:/path/to/folder"
        )


def _weights_cached(cfg: dict) -> bool:
    hub = (cfg.get("hf_hub") or "").strip("/")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id = "/".join(hub.split("/")[:2])
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(repo_id=repo_id, filename=filename)
            if isinstance(found, str) and os.path.isfile(found):
                return True
    url = cfg.get("url") or ""
    return bool(url) and (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file()


def _network_reachable(cfg: dict, timeout: float = 3.0) -> bool:
    host = "huggingface.co" if cfg.get("hf_hub") else (cfg.get("url", "").split("/")[2:3] or ["huggingface.co"])[0]
    endpoint = os.environ.get("HF_ENDPOINT", "")
    if endpoint and cfg.get("hf_hub"):
        host = endpoint.split("//")[-1].split("/")[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
