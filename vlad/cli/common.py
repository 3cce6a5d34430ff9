"""What the command modules share (the leaf of :mod:`vlad.cli`): exit codes, :class:`UsageError`, JSON output, the
model options, building the pipeline the options ask for, input expansion, progress and output files.

Every command module imports from here, never from another command module (see tests/unit/test_layers.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlad._argtypes import finite_float, positive_int, unit_float
from vlad.errors import ImageLoadError, VladError

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


class UsageError(VladError):
    """A problem with the command line itself (exit code 2)."""


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The ``model`` option group of ``detect``, ``eval`` and ``chat``."""
    g = p.add_argument_group("model")
    g.add_argument("--scorer", default="winclip", help="scorer name (see `vlad scorers`); default winclip")
    g.add_argument(
        "--backbone",
        default=None,
        help="backbone spec, e.g. openclip:ViT-B-16-plus-240@laion400m_e31, "
        "openclip:local-dir:/path, random:tiny; default: the scorer's",
    )
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    g.add_argument("--image-size", type=positive_int, default=None, help="model input side in pixels")
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.add_argument("--threshold", type=finite_float, default=None, help="image and pixel threshold, raw units")
    g.add_argument("--sensitivity", type=unit_float, default=0.5, help="0..1, higher flags more (default 0.5)")
    g.add_argument("--concepts", default=None, help='LAFT steering in words, e.g. "ignore colour" or "focus on cracks"')
    g.add_argument(
        "--detector",
        default=None,
        help="zero-shot detector for filo's boxes and for rules about objects: grounding-dino[:DIR], owlv2[:DIR], none",
    )
    g.add_argument(
        "--profile",
        default=None,
        choices=["paper", "vlad"],
        help="paper: the official code's computation (default; an imported checkpoint implies it); "
        "vlad: vlad's measured deviations (see docs/methods.md)",
    )
    g.add_argument(
        "--dattn",
        default=None,
        help="crane: DINOv2 spec for Crane+ D-Attn, e.g. timm:vit_base_patch14_reg4_dinov2.lvd142m",
    )


_SCORER_ONLY_OPTIONS = {"detector": ("filo",), "dattn": ("crane", "filo")}


def build_scorer(args: argparse.Namespace) -> Any:
    """The scorer the command line asks for; scorer-specific options are checked against the scorer."""
    from vlad.scorers import get_scorer

    extra: dict[str, Any] = {}
    for option, scorers in _SCORER_ONLY_OPTIONS.items():
        value = getattr(args, option, None)
        if value is None or (option == "detector" and getattr(args, "rules", None) and args.scorer not in scorers):
            continue  # --detector also serves the rules (required objects, "% of the part")
        if args.scorer not in scorers:
            raise UsageError(f"--{option} applies to the {' and '.join(scorers)} scorer(s), not {args.scorer!r}")
        extra[option] = value
    if getattr(args, "concepts", None):
        extra["concepts"] = args.concepts
    from vlad.cli.adapters import apply_adapter_option

    scorer = get_scorer(
        args.scorer,
        backbone=args.backbone,
        device=args.device,
        precision=args.precision,
        image_size=args.image_size,
        threshold=args.threshold,
        sensitivity=args.sensitivity,
        batch_size=args.batch_size,
        profile=getattr(args, "profile", None),
        **extra,
    )
    return apply_adapter_option(scorer, args)


def build_detector(args: argparse.Namespace, *, explain: Any = None) -> Any:
    """The inspection pipeline the options ask for (scorer, adapter, rules, overlays, explainer)."""
    from vlad.pipeline import Detector

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    return Detector(
        build_scorer(args),
        object_name=getattr(args, "object_name", "object"),
        rules=getattr(args, "rules", None),
        detector=getattr(args, "detector", None),
        explain=explain,
        overlays=not getattr(args, "no_overlay", True),
        on_warning=warn,
    )


class Progress:
    """``progress(done, total)`` for the pipeline, on stderr, counted in images.

    On a terminal: a tqdm bar (none for tiny jobs). Otherwise (logs, CI, pipes): a line such as ``eval: bottle 40/83``
    about every 10 %, never one per image.
    """

    def __init__(self, command: str, label: str = "") -> None:
        self.desc = f"{command} {label}".strip()
        self.prefix = f"{command}: {label} " if label else f"{command}: "
        self.bar: Any = None
        self.tenths = 0

    def __call__(self, done: int, total: int) -> None:
        if sys.stderr.isatty():
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.desc, unit="img", disable=total < 4, leave=False)
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.bar.close()
            return
        if 10 * done // max(total, 1) > self.tenths:
            self.tenths = 10 * done // total
            print(f"{self.prefix}{done}/{total}", file=sys.stderr, flush=True)


def unique_name(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``, ... when taken (case-insensitively, for macOS and Windows disks)."""
    name, n = stem, 1
    while name.lower() in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name.lower())
    return name


def save_map(path: Path, anomaly_map: np.ndarray) -> Path:
    """Writes a raw anomaly map as float32 ``.npy`` (``np.load`` reads it back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(anomaly_map, dtype=np.float32))
    return path


def expand_or_fail(inputs: Sequence[str], option: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    from vlad.data import expand_inputs

    files, problems = expand_inputs(inputs)
    if not files:
        detail = "; ".join(f"{p}: {msg}" for p, msg in problems) or "nothing given"
        raise UsageError(f"{option}: no images to read ({detail})")
    return files, problems


def load_references(refs: Sequence[str]) -> list[Any]:
    from vlad.data import load_image

    files, _ = expand_or_fail(refs, "--refs")
    try:
        return [load_image(f) for f in files]
    except ImageLoadError as exc:
        raise UsageError(f"--refs: {exc}") from exc
