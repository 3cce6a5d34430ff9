"""The ``vlad`` command line: ``detect``, ``eval``, ``scorers`` (the parser; :mod:`vlad.cli_commands` runs them).

Exit codes: 0 all good; 1 some images failed (the report still holds all the others); 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from vlad import __version__, train_cli
from vlad._argtypes import positive_int
from vlad.cli_common import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, UsageError, add_model_options, emit_json
from vlad.errors import VladError
from vlad.explain import cli as explain_cli
from vlad.rules import cli as rules_cli

logger = logging.getLogger("vlad")

_EXTENSION_HANDLERS: dict = {}  # subcommands contributed by other modules (train-adapter, chat, rules, ...)

# The exit codes, UsageError and emit_json live in vlad.cli_common; they stay importable from here.
__all__ = ["EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "UsageError", "build_parser", "emit_json", "main"]


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlad", description="Zero-shot anomaly detection for product images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--version", action="version", version=f"vlad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("detect", help="score images: anomaly maps, scores, regions, overlays")
    d.add_argument("inputs", nargs="+", help="image files and/or directories")
    d.add_argument("--object", required=True, dest="object_name", help="product name, e.g. bottle")
    d.add_argument("--refs", nargs="+", default=None, help="normal reference images or directories (few-shot)")
    d.add_argument("--out", default="vlad-out", help="output directory (overlays and report.jsonl)")
    d.add_argument("--format", choices=["table", "json"], default="table", help="what to print")
    d.add_argument("--no-overlay", action="store_true", help="do not write overlay images")
    d.add_argument(
        "--save-maps",
        action="store_true",
        help="also write each raw anomaly map as float32 .npy at the "
        "input image's resolution to <out>/maps/<stem>.npy (the report's `map` field)",
    )
    add_model_options(d)
    train_cli.add_adapter_option(d)
    rules_cli.add_rules_option(d)
    explain_cli.add_explain_options(d)

    e = sub.add_parser("eval", help="evaluate a scorer on an MVTec AD / VisA / folder dataset")
    e.add_argument("--root", required=True, help="dataset root")
    e.add_argument("--layout", required=True, choices=["mvtec", "visa", "folder"])
    e.add_argument("--category", nargs="+", default=None, help="categories (default: all)")
    e.add_argument("--limit", type=positive_int, default=None, help="at most N test images per category")
    e.add_argument("--shots", type=int, default=0, help="normal train images per category as references (k-shot)")
    e.add_argument("--seed", type=int, default=0, help="seed for choosing references and --limit subsets")
    e.add_argument(
        "--eval-size",
        type=positive_int,
        default=None,
        help="side at which pixel metrics are computed (default: the scorer's input size)",
    )
    e.add_argument(
        "--legacy-aupro",
        action="store_true",
        help="deprecated, no effect: the 200-threshold paper-style "
        "AUPRO (pixel_aupro_legacy) is always reported next to the exact one (pixel_aupro)",
    )
    e.add_argument("--out", default=None, help="write the metrics JSON here")
    e.add_argument(
        "--save-maps",
        action="store_true",
        help="also write each raw anomaly map as float32 .npy at the "
        "input image's resolution, in <JSON name>_maps/<category>/<defect>/ next to --out or in --maps-dir",
    )
    e.add_argument("--maps-dir", default=None, help="folder for the saved anomaly maps (implies --save-maps)")
    add_model_options(e)
    train_cli.add_adapter_option(e)
    rules_cli.add_rules_option(e)
    explain_cli._add_lvlm_options(e.add_argument_group("language-model verdicts (optional)"))
    e.set_defaults(lvlm=None)

    sub.add_parser("scorers", help="list the scorers")

    s = sub.add_parser("serve", help="start the web UI (Gradio) on 127.0.0.1:7860")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=positive_int, default=7860)
    s.add_argument("--scorer", default="winclip")
    s.add_argument("--backbone", default=None, help="backbone spec (default: the scorer's)")
    s.add_argument("--lvlm", default="template", help="explainer: template, openai:URL[#model], transformers:MODEL")
    s.add_argument("--device", default="auto")
    s.add_argument("--profile", default=None, choices=["paper", "vlad"], help="scorer profile (default paper)")
    s.add_argument("--adapter", default=None, metavar="NAME_OR_PATH", help="learned or imported adapter for the scorer")
    s.add_argument("--auth", default=None, help="user:password for basic login")
    _EXTENSION_HANDLERS.clear()
    _EXTENSION_HANDLERS.update(train_cli.register(sub))
    _EXTENSION_HANDLERS.update(explain_cli.register(sub))
    _EXTENSION_HANDLERS.update(rules_cli.register(sub))
    return parser


# ---------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from vlad.cli_commands import run_detect, run_eval, run_scorers, run_serve

    commands = {
        "detect": run_detect,
        "eval": run_eval,
        "scorers": run_scorers,
        "serve": run_serve,
        **_EXTENSION_HANDLERS,
    }
    try:
        return commands[args.command](args)
    except VladError as exc:
        print(f"vlad {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vlad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
