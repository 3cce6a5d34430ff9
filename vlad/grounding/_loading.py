"""Finding and loading a transformers detector (model + processor) from a Hub id or a local folder, offline-aware.

``from_pretrained`` on a model that is neither cached nor reachable retries the Hub for a long time and then raises
a generic error; here the cache and the network are checked first, so a missing model fails within seconds with a
message that says how to supply it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

from vlad.errors import ConfigError, WeightsNotFoundError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = ("1", "true", "yes", "on")
_LOADED: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def load_detector_model(
    ref: str | tuple[Any, Any],
    *,
    kind: str,
    model_types: tuple[str, ...],
    device: str,
    local_files_only: bool | None,
) -> tuple[Any, Any, str]:
    """Loads a zero-shot detection model and its processor, or accepts an already-built pair.

    Args:
        ref: a Hub id (``org/name``), a local folder saved with ``save_pretrained``, or a ``(model, processor)`` pair.
        kind: the detector spec prefix (``grounding-dino`` or ``owlv2``), used in messages.
        model_types: accepted ``config.model_type`` values.
        device: a resolved torch device string.
        local_files_only: True never downloads; None downloads unless ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``
            is set; False always allows a download.

    Returns:
        ``(model, processor, source)``: the model in eval mode on ``device``, its processor, and a description of where
        it came from (the folder, the Hub id, or ``"<in-memory>"``).

    Raises:
        ConfigError: a malformed reference, or a model of another type.
        WeightsNotFoundError: the model is neither on disk nor downloadable, or it cannot be loaded.
    """
    if isinstance(ref, tuple):
        return (*_check_pair(ref, model_types, kind, device), "<in-memory>")
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"detector model must be a Hub id, a local folder or a (model, processor) pair, got {ref!r}")
    source, local_only = _resolve_source(ref.strip(), kind, local_files_only)
    key = (kind, source, device)
    if key not in _LOADED:
        _LOADED[key] = _from_pretrained(source, kind, model_types, device, local_only)
    return (*_LOADED[key], source)


def folder_model_type(path: Path) -> str | None:
    """The ``model_type`` in a local model folder's ``config.json``, or None when it has no readable one."""
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def _resolve_source(ref: str, kind: str, local_files_only: bool | None) -> tuple[str, bool]:
    """Where to load from and whether to stay offline; fails fast when the weights cannot be had."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path.resolve()), True
    if path.exists() or ref.startswith(("/", "./", "../", "~", ".\\")) or not _HUB_ID.match(ref):
        raise WeightsNotFoundError(
            f"detector model {ref!r} is not a folder; pass a folder saved with save_pretrained "
            f"(--detector-model {kind}:/path/to/folder) or a Hugging Face Hub id such as org/name"
        )
    offline = _env_offline() if local_files_only is None else local_files_only
    if _hub_cached(ref):
        return ref, offline
    if offline:
        why = "offline mode is on (HF_HUB_OFFLINE / local_files_only)"
    elif not _hub_reachable():
        why = "the Hugging Face Hub is not reachable"
    else:
        return ref, False
    raise WeightsNotFoundError(
        f"detector model {ref!r} is not in the Hugging Face cache and {why}; download it once where there is network "
        f"(hf download {ref} --local-dir DIR) and pass --detector-model {kind}:DIR (Python: get_detector('{kind}:DIR'))"
    )


def _from_pretrained(source: str, kind: str, model_types: tuple[str, ...], device: str, local: bool) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsNotFoundError(f"cannot read the detector config of {source!r}: {_first_line(exc)}") from exc
    if config.model_type not in model_types:
        raise ConfigError(
            f"detector model {source!r} is a {config.model_type!r} model but {kind} needs one of {list(model_types)}"
        )
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsNotFoundError(f"cannot load detector model {source!r}: {_first_line(exc)}") from exc
    logger.info("loaded %s detector from %s on %s", kind, source, device)
    return model.eval().to(device), processor


def _check_pair(pair: tuple[Any, Any], model_types: tuple[str, ...], kind: str, device: str) -> tuple[Any, Any]:
    if len(pair) != 2:
        raise ConfigError(f"a prebuilt {kind} detector must be a (model, processor) pair, got {len(pair)} items")
    model, processor = pair
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in model_types:
        raise ConfigError(f"the prebuilt model is a {model_type!r} model but {kind} needs one of {list(model_types)}")
    if not callable(getattr(processor, "post_process_grounded_object_detection", None)):
        raise ConfigError(f"the prebuilt processor {type(processor).__name__} is not a zero-shot detection processor")
    return model.eval().to(device), processor


def _env_offline() -> bool:
    return any(os.environ.get(v, "0").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_cached(repo_id: str) -> bool:
    """True when the repo's config.json is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    found = try_to_load_from_cache(repo_id=repo_id, filename="config.json")
    return isinstance(found, str) and os.path.isfile(found)


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("//")[-1].split("/")[0]
    name, _, port = host.partition(":")
    default_port = 80 if endpoint.startswith("http://") else 443
    try:
        with socket.create_connection((name, int(port or default_port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
