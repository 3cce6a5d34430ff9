"""``vlad scorers``: list the scorers (no torch needed)."""

from __future__ import annotations

import argparse
from typing import Any

from vlad.cli.common import (
    EXIT_OK,
)


def run_scorers(args: argparse.Namespace) -> int:
    from vlad.scorers import list_scorers, scorer_summary

    for name in list_scorers():
        print(f"{name:10s} {scorer_summary(name)}")
    return EXIT_OK


def register(subparsers: Any) -> dict[str, Any]:
    """Adds ``scorers``; returns ``{"scorers": handler}``."""

    subparsers.add_parser("scorers", help="list the scorers")
    return {"scorers": run_scorers}
