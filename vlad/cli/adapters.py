"""``vlad train-adapter``, ``vlad import-checkpoint`` and the ``--adapter`` option of ``detect`` / ``eval`` / ``chat``
(torch loads only when they run). ``apply_adapter_option(scorer, args)`` applies ``--adapter`` after the scorer is
built, before ``fit()``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlad._argtypes import positive_float, positive_int
from vlad._optional import require

logger = logging.getLogger(__name__)

EXIT_OK = 0
Handler = Callable[[argparse.Namespace], int]


def register(subparsers: Any) -> dict[str, Handler]:
    """Add ``train-adapter`` to an argparse subparsers object; returns ``{"train-adapter": handler}``."""
    from vlad.adapters import METHODS
    from vlad.backbones import DEFAULT_BACKBONE

    p = subparsers.add_parser(
        "train-adapter",
        help="train learned Crane prompts or a LoRA adapter on a dataset with masks or on synthetic defects",
        description="Train Crane-style prompt context vectors (crane-prompts) or LoRA on the CLIP vision tower (lora). "
        "Writes <out>/adapter.json and the weights; use them with --adapter on detect / eval.",
    )
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--root", required=True, help="dataset root (for --layout folder: the category folder)")
    p.add_argument("--layout", required=True, choices=["mvtec", "visa", "folder"])
    p.add_argument("--category", nargs="+", default=None, help="categories to train on (default: all)")
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="plant synthetic defects in the normal train images instead of using the test split's masks",
    )
    p.add_argument("--epochs", type=positive_int, default=5, help="epochs, fixed a priori (default 5, as Crane)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--n-ctx", type=positive_int, default=12, help="learned context tokens per prompt (crane-prompts)")
    p.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA rank, alpha = 2 x rank (lora)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"backbone spec (default {DEFAULT_BACKBONE})")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    p.add_argument(
        "--image-size", type=positive_int, default=None, help="input side (default: Crane's, 518 for ViT-L/14@336)"
    )
    p.add_argument("--seed", type=int, default=111, help="seed (default 111, as Crane)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most N dataset images (a seeded subset)")
    p.add_argument("--out", required=True, help="output folder, e.g. adapters/NAME")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")

    i = subparsers.add_parser(
        "import-checkpoint",
        help="turn an officially released Crane / AnomalyCLIP checkpoint into a vlad adapter",
        description="Read an official release file (a plain torch state dict, loaded with weights_only: nothing in "
        "it is executed) and write a vlad adapter folder for --adapter. The imported prompts select the paper "
        "profile unless --profile says otherwise.",
    )
    i.add_argument("checkpoint", help="the release file, e.g. checkpoints/trained_on_visa_crane/epoch_5.pth")
    i.add_argument("--format", required=True, choices=["crane", "anomalyclip"], dest="checkpoint_format")
    i.add_argument(
        "--backbone", default=DEFAULT_BACKBONE, help=f"the CLIP it was trained on (default {DEFAULT_BACKBONE})"
    )
    i.add_argument("--out", required=True, help="adapter folder to write")
    i.add_argument("--force", action="store_true", help="import even if its token embeddings are another CLIP's")
    i.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    return {"train-adapter": run_train_adapter, "import-checkpoint": run_import_checkpoint}


def run_import_checkpoint(args: argparse.Namespace) -> int:
    for package in ("torch", "open_clip"):
        require(package, "clip", what="vlad import-checkpoint")
    from vlad.checkpoints import import_checkpoint

    out = import_checkpoint(
        args.checkpoint, args.checkpoint_format, args.backbone, args.out, force=args.force, overwrite=args.overwrite
    )
    scorer = "crane" if args.checkpoint_format == "crane" else "anomalyclip"
    print(f"adapter: {out}  (use --adapter {out} --scorer {scorer})")
    return EXIT_OK


def add_adapter_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--adapter NAME_OR_PATH`` (a bundled adapter name or a folder with adapter.json)."""
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="NAME_OR_PATH",
        help="learned adapter: a bundled name or a folder written by `vlad train-adapter`",
    )


def apply_adapter_option(scorer: Any, args: argparse.Namespace) -> Any:
    """Apply ``args.adapter`` (when given) to a freshly built scorer; returns the scorer."""
    name = getattr(args, "adapter", None)
    if name is None:
        return scorer
    from vlad.adapters import apply_adapter

    return apply_adapter(scorer, name)


def run_train_adapter(args: argparse.Namespace) -> int:
    """Train, save, print the per-epoch loss and where the adapter went."""
    for package in ("torch", "open_clip"):
        require(package, "train", what="vlad train-adapter")
    from vlad.adapters import METADATA_FILE, save_adapter
    from vlad.errors import ConfigError
    from vlad.training import TrainConfig, train_adapter

    out = Path(args.out)
    if (out / METADATA_FILE).exists() and not args.overwrite:
        raise ConfigError(f"--out {out} already holds an adapter; choose another folder or pass --overwrite")
    config = TrainConfig(
        method=args.method,
        root=args.root,
        layout=args.layout,
        categories=args.category,
        synthetic=args.synthetic,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        n_ctx=args.n_ctx,
        lora_rank=args.lora_rank,
        image_size=args.image_size,
        seed=args.seed,
        limit=args.limit,
    )

    def progress(epoch: int, loss: float) -> None:
        print(f"epoch {epoch}/{args.epochs}  loss {loss:.5f}", flush=True)

    adapter = train_adapter(config, args.backbone, device=args.device, progress=progress)
    folder = save_adapter(adapter, out, overwrite=args.overwrite)
    meta = adapter.metadata
    print(
        f"{meta.method} adapter for {meta.backbone} trained on {meta.training_data['images']} images "
        f"({meta.training_data['anomalous']} anomalous), {meta.epochs} epochs: {folder}"
    )
    return EXIT_OK
