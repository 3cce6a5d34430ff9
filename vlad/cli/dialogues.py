"""``vlad make-dialogues``: a training set of inspection dialogues from normal images with planted defects
(:mod:`vlad.explain.dialogues`; layout in docs/explainer.md, "Training dialogues")."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlad.cli.common import EXIT_OK, Progress, UsageError, expand_or_fail


def register(subparsers: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Adds ``make-dialogues``; returns ``{"make-dialogues": handler}``."""
    p = subparsers.add_parser(
        "make-dialogues",
        help="make a training set of inspection dialogues from normal images (synthetic defects, known masks)",
        description="Plants synthetic defects in half of the drawn normal images and writes chat-messages JSONL "
        "(dialogues.jsonl, images/, masks/, summary.json) for training an explainer with `vlad train-lvlm`.",
    )
    p.add_argument("--refs", nargs="+", required=True, help="normal images or folders of them")
    p.add_argument("--object", required=True, dest="object_name", help="product name, e.g. bottle")
    p.add_argument("--out", required=True, help="folder for the set")
    p.add_argument("--n", type=int, default=200, help="images to draw, 3 dialogues each (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); the same seed gives the same set")
    p.add_argument("--overwrite", action="store_true", help="replace a set already in --out")
    return {"make-dialogues": run_make_dialogues}


def run_make_dialogues(args: argparse.Namespace) -> int:
    from vlad.explain.dialogues import DIALOGUES_FILE, write_dialogues

    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    if not args.object_name.strip():
        raise UsageError("--object must name the product, e.g. --object bottle (it is empty)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the dialogues")
    if (out / DIALOGUES_FILE).exists() and not args.overwrite:
        raise UsageError(f"--out {out} already holds {DIALOGUES_FILE}; pass --overwrite to replace it")
    files, problems = expand_or_fail(args.refs, "--refs")
    for path, message in problems:
        print(f"warning: --refs: {path}: {message}")
    summary = write_dialogues(
        files, args.object_name, out, n=args.n, seed=args.seed, progress=Progress("make-dialogues", "images")
    )
    kinds = ", ".join(f"{k} {v}" for k, v in summary["records_per_kind"].items())
    print(f"dialogues: {out / DIALOGUES_FILE} ({summary['n_records']} records: {kinds})")
    print(
        f"images: {summary['n_images']} ({summary['n_anomalous']} with a planted defect, {summary['n_normal']} normal)"
    )
    print(f"yes-rate: {100 * summary['yes_rate']:.1f}%")
    print(f"summary: {out / 'summary.json'}")
    return EXIT_OK
