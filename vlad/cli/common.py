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
    g.add_argument(
        "--tile",
        type=tile_option,
        default=None,
        metavar="SIZE|auto",
        help="score large images as overlapping tiles of SIZE pixels, or auto (tiles of 2 model inputs for images "
        "longer than that); references are tiled the same way; cost: tiles + 1 forwards per image",
    )
    g.add_argument(
        "--tile-overlap",
        type=_overlap_option,
        default=0.25,
        metavar="F",
        help="share of a tile that overlaps its neighbour (default 0.25)",
    )


def tile_option(text: str) -> int | str | None:
    from vlad.scorers.tiling import Tiling

    try:
        tiling = Tiling.parse(text)
    except VladError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if tiling is None:
        return None
    return "auto" if tiling.tile is None else tiling.tile


def _overlap_option(text: str) -> float:
    from vlad.scorers.tiling import MAX_OVERLAP

    value = finite_float(text)
    if not 0.0 <= value <= MAX_OVERLAP:
        raise argparse.ArgumentTypeError(f"expected a value in [0, {MAX_OVERLAP}], got {text}")
    return value


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
        tile=getattr(args, "tile", None),
        tile_overlap=getattr(args, "tile_overlap", 0.25),
        **extra,
    )
    return apply_adapter_option(scorer, args)


def build_detector(args: argparse.Namespace, *, explain: Any = None, rules: Any = None) -> Any:
    """The inspection pipeline the options ask for (scorer, adapter, rules, overlays, explainer); ``rules``: the
    already parsed ``--rules`` (see :func:`check_options`)."""
    from vlad.pipeline import Detector

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    return Detector(
        build_scorer(args),
        object_name=getattr(args, "object_name", "object"),
        rules=rules if rules is not None else getattr(args, "rules", None),
        detector=getattr(args, "detector", None),
        explain=explain,
        overlays=not getattr(args, "no_overlay", True),
        full_res_overlay=getattr(args, "full_res_overlay", False),
        on_warning=warn,
    )


def check_options(args: argparse.Namespace, *, has_references: bool) -> Any:
    """Everything that can be checked before a model loads (seconds, not the 25-30 s of a model load): the product
    name, the threshold against the scorer's score range, the image size against the backbone's patch size, references
    for a scorer that needs them, and the rules (returned parsed, or None).

    Raises:
        UsageError: one line naming the option and what it accepts.
    """
    from vlad.backbones.spec import is_onnx_spec, patch_size_of
    from vlad.errors import BackboneError
    from vlad.scorers import scorer_facts

    name = getattr(args, "object_name", None)
    if name is not None and not name.strip():
        raise UsageError("--object must name the product, e.g. --object bottle (it is empty)")
    facts = scorer_facts(args.scorer)
    low, high = facts["score_range"]
    threshold = getattr(args, "threshold", None)
    if threshold is not None and not low <= threshold <= high:
        raise UsageError(f"--threshold {threshold:g} is outside the {args.scorer} score range [{low:g}, {high:g}]")
    size = getattr(args, "image_size", None)
    if size is not None:
        spec = getattr(args, "backbone", None) or facts["default_backbone"]
        try:
            patch = patch_size_of(spec)
        except BackboneError as exc:
            raise UsageError(f"--backbone: {exc}") from None
        if patch and size % patch:
            raise UsageError(
                f"--image-size {size} is not a multiple of the patch size {patch} of {spec}; "
                f"use e.g. {max(patch, size // patch * patch)} or {(size // patch + 1) * patch}"
            )
    if getattr(args, "tile", None) is not None and facts["transductive"]:
        raise UsageError(
            f"--tile: {args.scorer} scores each image against the others in its batch, so it cannot tile; "
            "drop --tile or use another scorer"
        )
    exported = is_onnx_spec(getattr(args, "backbone", None))  # an export holds its references
    if facts["needs_references"] and not has_references and not exported:
        raise UsageError(
            f"{args.scorer} needs normal reference images: give them with --refs (detect) or --shots (eval)"
        )
    rules = getattr(args, "rules", None)
    if not rules:
        return None
    from vlad.rules import load_rules_arg

    return load_rules_arg(rules)


def probe_lvlm(explain: Any) -> str | None:
    """Warn (never fail) when the language model of ``--explain --lvlm`` does not answer now; returns why (then the
    run uses the template explanation and says so only this once), else None."""
    if explain is None or not str(explain.lvlm).startswith("openai:"):
        return None
    from vlad.explain.backends import load_backend

    try:
        load_backend(explain.lvlm, timeout=min(5.0, explain.timeout), max_retries=0).list_models()
    except VladError as exc:
        print(f"warning: {exc}; explanations use the template", file=sys.stderr, flush=True)
        return str(exc)
    return None


def open_output_dir(out: Path) -> Path:
    """Make the output folder now, before any model loads; an existing file there or no write permission is a
    one-line usage error."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the report and overlays")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".vlad-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return out


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


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """The ``engine`` option group of ``detect`` and ``eval``: local (default) or a Ray cluster."""
    g = p.add_argument_group("engine (scale out; see docs/scaling.md)")
    g.add_argument("--engine", choices=["local", "ray"], default="local", help="local (this process) or ray")
    g.add_argument(
        "--ray-address",
        default=None,
        help="ray only: auto (the cluster this machine is part of), ray://HOST:10001 (Ray Client, e.g. KubeRay); "
        "default: a local Ray",
    )
    g.add_argument("--workers", type=positive_int, default=1, help="ray only: actors, each loading the models once")
    g.add_argument("--gpus-per-worker", type=finite_float, default=0.0, help="ray only: GPUs per actor (0.5 shares)")
    g.add_argument("--cpus-per-worker", type=finite_float, default=1.0, help="ray only: CPUs per actor")


def engine_options(args: argparse.Namespace) -> Any:
    """The :class:`vlad.distributed.RayOptions` of ``--engine ray`` (checked), or None for the local engine."""
    if getattr(args, "engine", "local") != "ray":
        for option in ("ray_address", "gpus_per_worker"):
            if getattr(args, option, None):
                raise UsageError(f"--{option.replace('_', '-')} needs --engine ray")
        return None
    from vlad._optional import require
    from vlad.distributed import RayOptions

    require("ray", "ray", what="--engine ray")  # now, not after the model has loaded
    options = RayOptions(args.ray_address, args.workers, args.gpus_per_worker, args.cpus_per_worker)
    options.check()
    return options
