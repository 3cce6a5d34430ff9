"""``vlad detect``: score images and folders; a report row for every input, overlays with their legends, maps,
explanations."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlad.cli.common import (
    EXIT_OK,
    EXIT_PARTIAL,
    Progress,
    UsageError,
    add_engine_options,
    add_model_options,
    build_detector,
    check_options,
    emit_json,
    engine_options,
    expand_or_fail,
    load_references,
    open_output_dir,
    probe_lvlm,
    unique_name,
)


def _names(files: list[Path]) -> dict[str, str]:
    """Each input's file stem for its overlay, legend and map, unique in the run and the same on every re-run."""
    used: set[str] = set()
    return {str(f): unique_name(f.stem, used) for f in files}


def _worker_detector(args: argparse.Namespace, explain: Any, rules: Any, lvlm_down: str | None) -> Any:
    """The pipeline a Ray worker builds (the same options as this process's)."""
    det = build_detector(args, explain=explain, rules=rules)
    if lvlm_down is not None:
        det.explainer.mark_down(lvlm_down)
    return det


def _records(det: Any, todo: list[str], args: argparse.Namespace, refs: Any, worker: Any) -> Iterator[tuple]:
    """``(record, overlay_png, legend_png)`` per input, from this process or a Ray pool (``worker``: its factory)."""
    options = engine_options(args)
    if options is None:
        for record in det.iter_inspect(todo, args.object_name, progress=Progress("detect")):
            yield record, None, None
        return
    from vlad.distributed import Group, ray_inspect

    progress = Progress("detect")
    group = Group(args.object_name, args.object_name, todo, list(refs or []))
    scorer = det.scorer
    remote = ray_inspect(worker, [group], options, transductive=scorer.transductive, batch_size=scorer.batch_size)
    for done, item in enumerate(remote, 1):
        progress(done, len(todo))
        yield item.record, item.overlay_png, item.legend_png


def _detect_rows(
    det: Any, files: list[Path], problems: list, args: argparse.Namespace, out: Any, **engine: Any
) -> list:
    """Report rows, the same keys for every input: unreadable ones first, then one per file as it is scored. Each row
    is appended to ``report.jsonl`` and flushed at once, so a crash or Ctrl-C never loses the results so far; a re-run
    with the same settings skips the inputs already reported (see :mod:`vlad.reportlog`)."""
    from vlad.pipeline import InspectionRecord
    from vlad.reportlog import RecordWriter, ReportLog, settings_fingerprint

    settings, refs = det.settings(), engine.get("refs")
    outputs = {"overlays": not args.no_overlay, "full_res": args.full_res_overlay, "maps": args.save_maps}
    scored_as = {**settings, "object": args.object_name}  # the product name changes prompts and scores too
    log = ReportLog(out, settings_fingerprint(scored_as, references=refs, outputs=outputs), resume=not args.fresh)
    writer = RecordWriter(
        out, log, settings, _names(files), explain=det.explainer is not None, save_maps=args.save_maps
    )
    try:
        for p, msg in problems:
            writer.write(InspectionRecord(str(p), args.object_name, error=msg))
        todo = [str(f) for f in files if str(f) not in log.done]
        if len(todo) < len(files):
            print(
                f"detect: resuming: {len(files) - len(todo)} of {len(files)} images already reported", file=sys.stderr
            )
        for record, overlay, legend in _records(det, todo, args, refs, engine.get("worker")):
            writer.write(record, overlay, legend)
    finally:
        log.close()
    return log.finish([str(p) for p, _ in problems] + [str(f) for f in files])


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


def _open_out(out: str) -> Any:
    """``--out`` as a :class:`vlad.reportlog.Output`: a local folder (checked now, before any model loads) or an
    fsspec URI."""
    from vlad.reportlog import Output, is_uri

    if not is_uri(out):
        return Output(open_output_dir(Path(out.removeprefix("file://"))))
    try:
        return Output(out)
    except (OSError, ValueError, ImportError) as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc})") from None


def run_detect(args: argparse.Namespace) -> int:
    explain = None
    if getattr(args, "explain", False):
        from vlad.cli.chat import explain_options

        explain = explain_options(args)
        explain.check()
    rules = check_options(args, has_references=bool(args.refs))
    files, problems = expand_or_fail(args.inputs, "inputs")
    engine_options(args)
    out = _open_out(args.out)
    refs = load_references(args.refs) if args.refs is not None else None
    lvlm_down = probe_lvlm(explain)
    det = _worker_detector(args, explain, rules, lvlm_down)
    if refs:
        det.fit(refs)
    worker = functools.partial(_worker_detector, args, explain, rules, lvlm_down)
    rows = _detect_rows(det, files, problems, args, out, refs=refs, worker=worker)
    report = out.path("report.jsonl")
    failed = sum(1 for r in rows if r.get("error"))
    if args.format == "json":
        emit_json({"report": report, "out": out.root, "failed": failed, "results": rows})
    else:
        _print_table(rows)
        warnings = {w for r in rows for w in r.get("warnings") or []}
        for w in sorted(warnings):
            print(f"warning: {w}")
        print(f"report: {report}")
        if not args.no_overlay:
            print(f"overlays and legends: {out.root}/")
        if getattr(args, "save_maps", False):
            print(f"anomaly maps: {out.path('maps')}/")
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
    d.add_argument(
        "--fresh",
        action="store_true",
        help="start the report afresh (default: re-running with the same --out and settings skips the images "
        "already reported)",
    )
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
    add_engine_options(d)
    add_adapter_option(d)
    add_rules_option(d)
    add_explain_options(d)

    return {"detect": run_detect}
