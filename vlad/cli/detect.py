"""``vlad detect``: score images and folders; a report row for every input, overlays with their legends, maps,
explanations."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vlad.cli.common import (
    EXIT_OK,
    EXIT_PARTIAL,
    Progress,
    add_model_options,
    build_detector,
    check_options,
    emit_json,
    expand_or_fail,
    load_references,
    open_output_dir,
    probe_lvlm,
    save_map,
    unique_name,
)


def _detect_rows(det: Any, files: list[Path], problems: list, args: argparse.Namespace, out: Path, fh: Any) -> list:
    """Report rows, the same keys for every input: unreadable ones first, then one per file as it is scored. Each row
    is written to ``fh`` and flushed at once, so a crash or Ctrl-C never loses the results so far."""
    from vlad.pipeline import InspectionRecord

    settings, explain = det.settings(), det.explainer is not None
    rows: list[dict[str, Any]] = []

    def keep(row: dict[str, Any]) -> None:
        rows.append(row)
        fh.write(json.dumps(row) + "\n")
        fh.flush()

    for p, msg in problems:
        keep(InspectionRecord(str(p), args.object_name, error=msg).to_row(settings, explain=explain))
    used: set[str] = set()
    for record in det.iter_inspect([str(f) for f in files], args.object_name, progress=Progress("detect")):
        overlay_path = map_path = None
        if record.ok:
            name = unique_name(Path(record.source).stem, used)  # the same name for the overlay and the map
            if record.overlay is not None:
                overlay_path = out / f"{name}_overlay.png"
                record.overlay.save(overlay_path)
            if record.legend is not None:
                record.legend.save(out / f"{name}_legend.png")
            if getattr(args, "save_maps", False):
                map_path = save_map(out / "maps" / f"{name}.npy", record.result.anomaly_map)
        keep(record.to_row(settings, overlay_path=overlay_path, map_path=map_path, explain=explain))
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'image':40s} {'verdict':10s} {'score':>8s} {'norm':>6s} {'regions':>7s}  where"
    print(header)
    for r in rows:
        name = Path(r["path"]).name[:40]
        if r.get("error"):
            print(f"{name:40s} {'ERROR':10s} {r['error']}")
            continue
        where = ", ".join(reg["position"] for reg in r["regions"][:3])
        print(
            f"{name:40s} {r['verdict']:10s} {r['pred_score']:8.4f} {r['normalized_score']:6.3f} "
            f"{len(r['regions']):7d}  {where}"
        )


def run_detect(args: argparse.Namespace) -> int:
    explain = None
    if getattr(args, "explain", False):
        from vlad.cli.chat import explain_options

        explain = explain_options(args)
        explain.check()
    rules = check_options(args, has_references=bool(args.refs))
    files, problems = expand_or_fail(args.inputs, "inputs")
    out = open_output_dir(Path(args.out))
    refs = load_references(args.refs) if args.refs is not None else None
    lvlm_down = probe_lvlm(explain)
    det = build_detector(args, explain=explain, rules=rules)
    if lvlm_down is not None:
        det.explainer.mark_down(lvlm_down)
    if refs:
        det.fit(refs)
    report = out / "report.jsonl"
    with report.open("w", encoding="utf-8") as fh:
        rows = _detect_rows(det, files, problems, args, out, fh)
    failed = sum(1 for r in rows if r.get("error"))
    if args.format == "json":
        emit_json({"report": str(report), "out": str(out), "failed": failed, "results": rows})
    else:
        _print_table(rows)
        warnings = {w for r in rows for w in r.get("warnings") or []}
        for w in sorted(warnings):
            print(f"warning: {w}")
        print(f"report: {report}")
        if not args.no_overlay:
            print(f"overlays and legends: {out}/")
        if getattr(args, "save_maps", False):
            print(f"anomaly maps: {out / 'maps'}/")
    if failed:
        print(f"vlad detect: {failed} of {len(rows)} images failed (see report.jsonl)", file=sys.stderr)
    return EXIT_PARTIAL if failed else EXIT_OK


def register(subparsers: Any) -> dict[str, Any]:
    """Adds ``detect``; returns ``{"detect": handler}``."""
    from vlad.cli.adapters import add_adapter_option
    from vlad.cli.chat import add_explain_options
    from vlad.cli.rules import add_rules_option

    d = subparsers.add_parser("detect", help="score images: anomaly maps, scores, regions, overlays")
    d.add_argument("inputs", nargs="+", help="image files and/or directories")
    d.add_argument("--object", required=True, dest="object_name", help="product name, e.g. bottle")
    d.add_argument("--refs", nargs="+", default=None, help="normal reference images or directories (few-shot)")
    d.add_argument("--out", default="vlad-out", help="output directory (overlays and report.jsonl)")
    d.add_argument("--format", choices=["table", "json"], default="table", help="what to print")
    d.add_argument("--no-overlay", action="store_true", help="do not write overlay and legend images")
    d.add_argument(
        "--full-res-overlay",
        action="store_true",
        help="draw overlays at the input's size however large (default: the long side bounded at 2048 px)",
    )
    d.add_argument(
        "--save-maps",
        action="store_true",
        help="also write each raw anomaly map as float32 .npy at the "
        "input image's resolution to <out>/maps/<stem>.npy (the report's `map` field)",
    )
    add_model_options(d)
    add_adapter_option(d)
    add_rules_option(d)
    add_explain_options(d)

    return {"detect": run_detect}
