"""Command-line pieces of the rules: ``vlad rules check`` and the ``--rules`` option of ``vlad detect`` / ``eval``.

:mod:`vlad.cli` wires these in: ``register(subparsers)`` adds ``rules`` (with the subcommand ``check``) and returns
``{"rules": handler}``; ``add_rules_option(parser)`` adds ``--rules TEXT_OR_FILE``; ``load_rules_arg(value)`` turns
its value into a :class:`~vlad.rules.schema.RuleSet` (a usage error when something is not understood). The loading
itself lives in :mod:`vlad.rules.load` (re-exported here), so that the library never imports a CLI module.

``vlad rules check`` exit codes: 0 every rule understood and no contradictions; 1 something not understood or
contradictory (all of it is printed); 2 usage error (no rules, a missing or invalid rules file, a bad option).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from vlad.errors import VladError
from vlad.rules.load import TEXT_SUFFIXES, load_rules_arg, read_rules_arg
from vlad.rules.parse import ParseReport
from vlad.rules.schema import RuleSet

EXIT_OK, EXIT_NOT_UNDERSTOOD, EXIT_USAGE = 0, 1, 2
RULES_HELP = (
    'natural-language rules, e.g. "scratches on the label are fine; a bent pin is critical", or a rules / product '
    "profile file (.yaml, .yml, .json; .txt holds plain-language rules); see `vlad rules check`"
)

__all__ = ["TEXT_SUFFIXES", "add_rules_option", "load_rules_arg", "main", "read_rules_arg", "register", "run_rules"]


def register(subparsers: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Adds the ``rules`` command (subcommand ``check``) and returns ``{"rules": handler}``."""
    r = subparsers.add_parser("rules", help="natural-language anomaly rules: see how vlad understands them")
    sub = r.add_subparsers(dest="rules_command", required=True)
    c = sub.add_parser("check", help="parse rules and print what vlad understood (exit 1 if not everything)")
    c.add_argument(
        "rules",
        nargs="+",
        metavar="TEXT_OR_FILE",
        help="rules in words (several arguments are several rules) or one .yaml / .yml / .json / .txt file",
    )
    c.add_argument(
        "--lvlm",
        default=None,
        metavar="SPEC",
        help="parse through a language model first, e.g. "
        "openai:http://127.0.0.1:8000/v1 (falls back to the built-in parser, and says so)",
    )
    c.add_argument("--lvlm-timeout", type=float, default=60.0, metavar="SECONDS", help="default 60")
    c.add_argument("--format", choices=["table", "json"], default="table", help="what to print")
    return {"rules": run_rules}


def add_rules_option(parser: argparse.ArgumentParser) -> None:
    """Adds ``--rules TEXT_OR_FILE`` (default None)."""
    parser.add_argument("--rules", default=None, metavar="TEXT_OR_FILE", help=RULES_HELP)


# ---------------------------------------------------------------------------------------------------- vlad rules check
def run_rules(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The ``vlad rules`` handler (subcommand ``check``)."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        report = read_rules_arg(args.rules, lvlm=args.lvlm, timeout=args.lvlm_timeout)
    except VladError as exc:
        print(f"vlad rules check: error: {exc}", file=err)
        return EXIT_USAGE
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=2), file=out)
    else:
        print_report(report, out)
    return EXIT_OK if report.ok else EXIT_NOT_UNDERSTOOD


def print_report(report: ParseReport, out: TextIO) -> None:
    """The understood lines, a table of the structured rules, what was not understood, contradictions and notes."""
    for note in report.notes:
        print(f"note: {note}", file=out)
    print("\n".join(report.understood) or "I understood no rule.", file=out)
    rows = rule_rows(report.rules)
    if rows:
        print("", file=out)
        print(format_table(["#", "kind", "settings", "your words"], rows), file=out)
    for title, lines in (("Not understood", report.not_understood), ("Contradictions", report.contradictions)):
        if lines:
            print(f"\n{title}:", file=out)
            print("\n".join(f"  - {line}" for line in lines), file=out)
    verdict = "all rules understood" if report.ok else "some rules need attention"
    print(f"\n{len(rows)} rule(s) understood; {verdict}.", file=out)


def rule_rows(ruleset: RuleSet) -> list[list[str]]:
    """One table row per rule, then one for a given verdict policy and one for a camera scale: number, kind,
    settings, the user's words. Row for row what ``ParseReport.understood`` says."""
    rows = []
    for i, rule in enumerate(ruleset.rules, start=1):
        data = rule.model_dump(mode="json", exclude={"kind", "text"}, exclude_none=True)
        rows.append([str(i), rule.kind, _settings(data), rule.text])
    policy = ruleset.policy
    if ruleset.shows_policy:
        data = policy.model_dump(mode="json", exclude={"text"})
        rows.append([str(len(rows) + 1), "policy", _settings(data), policy.text])
    if ruleset.px_per_mm is not None:
        rows.append([str(len(rows) + 1), "setting", f"px_per_mm={ruleset.px_per_mm:g}", ruleset.px_per_mm_text])
    return rows


def _settings(data: dict[str, Any]) -> str:
    parts = []
    for key, value in data.items():
        if value in ([], None):
            continue
        if isinstance(value, dict):
            value = "{" + _settings(value) + "}"
        elif isinstance(value, list):
            value = "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
        elif isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlad.cli.rules rules check ...``: the ``rules`` command on its own."""
    parser = argparse.ArgumentParser(prog="vlad", description="natural-language anomaly rules")
    handlers = register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
