"""The ``vlad`` command line: one module per command, each with ``register(subparsers) -> {name: handler}``.

``detect``, ``eval``, ``scorers``, ``serve`` (:mod:`vlad.cli.detect`, :mod:`vlad.cli.evaluate`, ...), ``train-adapter``
and ``import-checkpoint`` (:mod:`vlad.cli.adapters`), ``chat`` and ``lvlm-check`` (:mod:`vlad.cli.chat`), ``rules``
(:mod:`vlad.cli.rules`), ``make-dialogues`` (:mod:`vlad.cli.dialogues`), ``train-lvlm``
(:mod:`vlad.cli.train_lvlm`) and ``export`` (:mod:`vlad.cli.export`). What they share is in :mod:`vlad.cli.common`.
No library module imports this package.

Exit codes: 0 all good; 1 some images failed (the report still holds all the others); 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from vlad import __version__
from vlad.cli import adapters, chat, detect, dialogues, evaluate, export, rules, scorers, serve, train_lvlm
from vlad.cli.common import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, UsageError, emit_json
from vlad.errors import VladError

logger = logging.getLogger("vlad")

COMMAND_MODULES = (detect, evaluate, scorers, serve, adapters, chat, rules, dialogues, train_lvlm, export)
_HANDLERS: dict = {}

__all__ = ["EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "UsageError", "build_parser", "emit_json", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlad", description="Zero-shot anomaly detection for product images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--version", action="version", version=f"vlad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _HANDLERS.clear()
    for module in COMMAND_MODULES:
        _HANDLERS.update(module.register(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return _HANDLERS[args.command](args)
    except VladError as exc:
        print(f"vlad {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a disk full, a folder removed under the run: one line, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"vlad {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vlad: interrupted", file=sys.stderr)
        return 130
