"""What the command-line modules share: exit codes, :class:`UsageError`, JSON output, the model options and building
the scorer they ask for.

:mod:`vlad.cli` (the parser), :mod:`vlad.cli_commands`, :mod:`vlad.explain.cli` and :mod:`vlad.train_cli` import from
here, never from each other's modules in a circle (see tests/unit/test_layers.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vlad._argtypes import finite_float, positive_int, unit_float
from vlad.errors import VladError

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
    from vlad.train_cli import apply_adapter_option

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
