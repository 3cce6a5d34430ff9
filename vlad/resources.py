"""Find the data folders that ship with vlad (``prompts/``, ``adapters/``, sample images).

In a wheel they live under ``vlad/_bundled/``; in a source checkout they are the repository's top-level folders.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from vlad.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    for candidate in (_PACKAGE_DIR / "_bundled" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"vlad's bundled folder {name!r} is missing; reinstall vlad")


def prompts_dir() -> Path:
    return _data_dir("prompts")


def adapters_dir() -> Path:
    return _data_dir("adapters")


def samples_dir() -> Path:
    """Bundled sample images (synthetic parts, some with a planted defect)."""
    return _PACKAGE_DIR / "samples"


@cache
def load_prompt_file(name: str) -> dict[str, Any]:
    """Parse ``prompts/<name>.yaml`` (cached; treat the result as read-only)."""
    path = prompts_dir() / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in prompts_dir().glob("*.yaml"))
        raise ConfigError(f"no prompt file {path.name!r}; available: {available}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks (provenance of imported checkpoints and exported models)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
