"""Backbone spec strings (parsed without torch) and the weight checks done before open_clip loads a model.

:mod:`vlad.backbones` re-exports everything here; :mod:`vlad.backbones.clip` imports it from this module so that
the package's lazy :func:`~vlad.backbones.load_backbone` and the model wrapper do not import each other.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from vlad.errors import BackboneError, WeightsNotFoundError

TINY_MODEL = "vlad-tiny"
ONNX_PREFIX = "onnx:"
"""``onnx:DIR`` names a model exported by ``vlad export --format onnx`` (run by onnxruntime, see
:mod:`vlad.scorers.onnx_runtime`): a scorer's backbone spec, but not a CLIP that :func:`parse_spec` loads."""
_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_SPEC_FORMS = (
    "openclip:NAME@TAG, openclip:NAME@/path/weights.safetensors, openclip:local-dir:/path, "
    "openclip:hf-hub:org/repo, a directory path, random:tiny or random:NAME"
)


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
    if is_onnx_spec(spec):
        raise BackboneError(
            f"{spec!r} is an exported model, not a CLIP backbone: give it as a scorer's backbone "
            "(--backbone onnx:DIR, get_scorer(name, backbone='onnx:DIR')), which runs it with onnxruntime"
        )
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


def is_onnx_spec(spec: object) -> bool:
    """True for an ``onnx:DIR`` spec (an exported model, see :data:`ONNX_PREFIX`)."""
    return isinstance(spec, str) and spec.strip().startswith(ONNX_PREFIX)


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


def patch_size_of(spec: str) -> int | None:
    """The vision patch size a spec's architecture has, read from its config without loading weights (None when it
    cannot be known before loading: Hub repos, unknown names)."""
    import json

    if is_onnx_spec(spec):
        return None  # the export's manifest holds its image size
    parsed = parse_spec(spec)
    if parsed.model == TINY_MODEL:
        config = json.loads((_CONFIG_DIR / f"{TINY_MODEL}.json").read_text(encoding="utf-8"))
    elif parsed.model.startswith("local-dir:"):
        path = Path(parsed.model.removeprefix("local-dir:")) / "open_clip_config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8")).get("model_cfg", {})
        except (OSError, ValueError):
            return None
    elif parsed.model.startswith("hf-hub:"):
        return None
    else:
        import open_clip

        config = open_clip.get_model_config(parsed.model) or {}
    size = config.get("vision_cfg", {}).get("patch_size")
    return int(size) if isinstance(size, int) else None
