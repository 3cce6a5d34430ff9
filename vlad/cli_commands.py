"""What the ``vlad`` subcommands do (the parser lives in :mod:`vlad.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import vlad
from vlad._optional import require
from vlad.cli_common import EXIT_OK, EXIT_PARTIAL, UsageError, build_detector, emit_json
from vlad.errors import ImageLoadError

# ---------------------------------------------------------------------- shared


class _Progress:
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


def _unique_name(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``, ... when taken (case-insensitively, for macOS and Windows disks)."""
    name, n = stem, 1
    while name.lower() in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name.lower())
    return name


def _save_map(path: Path, anomaly_map: np.ndarray) -> Path:
    """Writes a raw anomaly map as float32 ``.npy`` (``np.load`` reads it back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(anomaly_map, dtype=np.float32))
    return path


def _expand_or_fail(inputs: Sequence[str], option: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    from vlad.data import expand_inputs

    files, problems = expand_inputs(inputs)
    if not files:
        detail = "; ".join(f"{p}: {msg}" for p, msg in problems) or "nothing given"
        raise UsageError(f"{option}: no images to read ({detail})")
    return files, problems


def run_scorers(args: argparse.Namespace) -> int:
    from vlad.scorers import list_scorers, scorer_summary

    for name in list_scorers():
        print(f"{name:10s} {scorer_summary(name)}")
    return EXIT_OK


# ---------------------------------------------------------------------- detect


def _load_references(refs: Sequence[str]) -> list[Any]:
    from vlad.data import load_image

    files, _ = _expand_or_fail(refs, "--refs")
    try:
        return [load_image(f) for f in files]
    except ImageLoadError as exc:
        raise UsageError(f"--refs: {exc}") from exc


def _detect_rows(det: Any, files: list[Path], problems: list, args: argparse.Namespace, out: Path) -> list[dict]:
    """Report rows, the same keys for every input: unreadable ones first, then one per file in order."""
    from vlad.pipeline import InspectionRecord

    settings, explain = det.settings(), det.explainer is not None
    rows = [
        InspectionRecord(str(p), args.object_name, error=msg).to_row(settings, explain=explain) for p, msg in problems
    ]
    used: set[str] = set()
    for record in det.inspect_many([str(f) for f in files], args.object_name, progress=_Progress("detect")):
        overlay_path = map_path = None
        if record.ok:
            name = _unique_name(Path(record.source).stem, used)  # the same name for the overlay and the map
            if record.overlay is not None:
                overlay_path = out / f"{name}_overlay.png"
                record.overlay.save(overlay_path)
            if getattr(args, "save_maps", False):
                map_path = _save_map(out / "maps" / f"{name}.npy", record.result.anomaly_map)
        rows.append(record.to_row(settings, overlay_path=overlay_path, map_path=map_path, explain=explain))
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
        from vlad.explain.cli import explain_options

        explain = explain_options(args)
        explain.check()
    files, problems = _expand_or_fail(args.inputs, "inputs")
    refs = _load_references(args.refs) if args.refs is not None else None
    det = build_detector(args, explain=explain)
    if refs:
        det.fit(refs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _detect_rows(det, files, problems, args, out)
    report = out / "report.jsonl"
    with report.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
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
            print(f"overlays: {out}/")
        if getattr(args, "save_maps", False):
            print(f"anomaly maps: {out / 'maps'}/")
    if failed:
        print(f"vlad detect: {failed} of {len(rows)} images failed (see report.jsonl)", file=sys.stderr)
    return EXIT_PARTIAL if failed else EXIT_OK


# ---------------------------------------------------------------------- eval


def _limit(samples: list[Any], limit: int | None, seed: int) -> list[Any]:
    """A deterministic subset that keeps both classes: alternate normal / anomalous picks."""
    if limit is None or len(samples) <= limit:
        return samples
    rng = np.random.default_rng(seed)
    normal = [s for s in samples if s.label == 0]
    bad = [s for s in samples if s.label == 1]
    rng.shuffle(normal)
    rng.shuffle(bad)
    picked: list[Any] = []
    while len(picked) < limit and (normal or bad):
        for pool in (bad, normal):
            if pool and len(picked) < limit:
                picked.append(pool.pop())
    return sorted(picked, key=lambda s: str(s.path))


def _resize_map(amap: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(amap).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _evaluate_category(
    det: Any,
    samples: list[Any],
    name: str,
    args: argparse.Namespace,
    tracker: Any = None,
    maps_dir: Path | None = None,
) -> dict[str, Any]:
    """Scores one category and computes its metrics.

    Image metrics use every scored image; pixel metrics use the normal images (all-zero masks) and the anomalous images
    that have a mask, and are NaN with a ``pixel_metrics_note`` when no anomalous image has one. With ``maps_dir``,
    each raw map is saved at the input resolution as ``maps_dir/<category>/<defect>/<stem>.npy``.
    """
    from vlad.data import load_mask
    from vlad.metrics import compute_image_metrics, compute_pixel_metrics
    from vlad.metrics._summary import PIXEL_METRICS

    size = args.eval_size or det.scorer.image_size
    scores, labels, maps, masks, pixel_ok, images, failed = [], [], [], [], [], [], []
    used: dict[Path, set[str]] = defaultdict(set)
    category = samples[0].category if samples else name
    records = det.inspect_many([str(s.path) for s in samples], name, progress=_Progress("eval", category))
    for s, record in zip(samples, records, strict=True):
        if not record.ok:
            failed.append({"path": str(s.path), "error": record.error})
            continue
        result = record.result
        if tracker is not None:
            tracker.add(s.category, s.label, (record.explanation or {}).get("report"))
        scores.append(result.pred_score)
        labels.append(s.label)
        maps.append(_resize_map(result.anomaly_map, size))
        masks.append(load_mask(s.mask_path, (size, size)) if s.mask_path else np.zeros((size, size), bool))
        pixel_ok.append(s.label == 0 or s.mask_path is not None)
        map_path = None
        if maps_dir is not None:
            folder = maps_dir / s.category / s.defect
            map_path = _save_map(folder / f"{_unique_name(s.path.stem, used[folder])}.npy", result.anomaly_map)
        images.append(
            {
                "path": str(s.path),
                "category": s.category,
                "label": int(s.label),
                "defect": s.defect,
                "pred_score": float(result.pred_score),
                "mask": str(s.mask_path) if s.mask_path else None,
                "map": str(map_path) if map_path else None,
            }
        )
    keep, bad = np.array(pixel_ok, bool), np.array(labels, int) == 1
    metrics = compute_image_metrics(np.array(scores), np.array(labels))
    note = None
    if (keep & bad).any():
        metrics.update(compute_pixel_metrics(np.stack(maps)[keep], np.stack(masks)[keep]))
        if not keep.all():
            note = (
                f"pixel metrics over the {int(keep.sum())} of {len(keep)} images with ground truth: "
                f"{int((~keep).sum())} anomalous image(s) have no mask"
            )
    else:
        metrics.update(dict.fromkeys(PIXEL_METRICS, float("nan")))
        note = "pixel metrics n/a: " + ("no anomalous image has a mask" if bad.any() else "no anomalous image")
    return {
        "metrics": metrics,
        "n_images": len(scores),
        "n_anomalous": int(np.sum(labels)),
        "n_without_mask": int((~keep).sum()),
        "pixel_metrics_note": note,
        "failed": failed,
        "images": images,
    }


_COLUMNS = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1max": "P-F1max",
    "pixel_aupro": "AUPRO",
    "pixel_aupro_legacy": "AUPRO-legacy",
}


def _print_metrics(per_category: dict[str, dict[str, float]], mean: dict[str, float], notes: dict[str, str]) -> None:
    """The metrics table in percent; ``n/a`` where a metric is undefined, then the column legend and the notes."""
    keys = list(mean)
    labels = [_COLUMNS.get(k, k) for k in keys]
    print(f"{'category':16s} " + " ".join(f"{label:>8s}" for label in labels))
    for name, m in [*per_category.items(), ("mean", mean)]:
        cells = []
        for k, label in zip(keys, labels, strict=True):
            value = m.get(k, float("nan"))
            cell = "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"
            cells.append(f"{cell:>{max(8, len(label))}s}")
        print(f"{name:16s} " + " ".join(cells))
    if "pixel_aupro" in mean:
        print(
            "I-/P-: image/pixel level; AUPRO: exact, FPR limit 0.3; AUPRO-legacy: 200 thresholds, FPR < 0.3 "
            "re-scaled to [0, 1] (cflow-ad, as most papers print it)"
        )
    for name, note in notes.items():
        print(f"note: {name}: {note}")


def _eval_maps_dir(args: argparse.Namespace) -> Path | None:
    """Where ``--save-maps`` / ``--maps-dir`` put the maps: ``--maps-dir``, else ``<JSON stem>_maps`` next to --out."""
    if getattr(args, "maps_dir", None):
        return Path(args.maps_dir)
    if not getattr(args, "save_maps", False):
        return None
    if not args.out:
        raise UsageError("--save-maps needs --out (the maps go next to the JSON) or --maps-dir")
    out = Path(args.out)
    return out.with_name(f"{out.stem}_maps")


def run_eval(args: argparse.Namespace) -> int:
    from vlad.data import load_dataset, prompt_name, reference_images
    from vlad.data.defects import prompt_overlap_warnings
    from vlad.metrics import macro_mean

    maps_dir = _eval_maps_dir(args)
    samples = load_dataset(args.root, args.layout, args.category, split="test")
    by_category: dict[str, list[Any]] = defaultdict(list)
    for s in samples:
        by_category[s.category].append(s)
    explain = tracker = None
    if args.lvlm:
        from vlad.explain.cli import explain_options
        from vlad.explain.verdicts import VerdictTracker

        explain = explain_options(args)
        explain.check()
        tracker = VerdictTracker()
    # concept rules change prompts / features and so the scores; region and verdict rules change labels only,
    # which the threshold-free metrics below do not read
    det = build_detector(args, explain=explain)
    scorer = det.scorer
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for category, items in sorted(by_category.items()):
        name = prompt_name(category)
        if args.shots > 0:
            det.fit(reference_images(args.root, args.layout, category, args.shots, seed=args.seed))
        else:
            det.clear_references()
        picked = _limit(items, args.limit, args.seed)
        results[category] = _evaluate_category(det, picked, name, args, tracker, maps_dir)
    images = [record for r in results.values() for record in r.pop("images")]
    per_category = {c: r["metrics"] for c, r in results.items()}
    mean = macro_mean(per_category)
    notes = {c: r["pixel_metrics_note"] for c, r in results.items() if r["pixel_metrics_note"]}
    _print_metrics(per_category, mean, notes)
    if tracker is not None:
        print(f"\nlanguage-model verdicts ({args.lvlm}):\n{tracker.format_table()}")
    failed = sum(len(r["failed"]) for r in results.values())
    payload = {
        "settings": {
            **scorer.describe(),
            "root": str(args.root),
            "layout": args.layout,
            "shots": args.shots,
            "seed": args.seed,
            "limit": args.limit,
            "eval_size": args.eval_size or scorer.image_size,
            "auxiliary_training_data": None,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "vlad_version": vlad.__version__,
            "maps_dir": None if maps_dir is None else str(maps_dir),
        },
        "per_category": results,
        "mean": mean,
        "pixel_metrics_note": "; ".join(f"{c}: {n}" for c, n in notes.items()) or None,
        "images": images,
        "lvlm_verdicts": None if tracker is None else {"lvlm": args.lvlm, **tracker.summary()},
        "seconds": round(time.perf_counter() - started, 2),
        "warnings": list(scorer.warnings()) + prompt_overlap_warnings(scorer, samples),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(_clean(payload), indent=2), encoding="utf-8")
        print(f"metrics: {args.out}")
    if maps_dir is not None:
        print(f"anomaly maps: {maps_dir}/")
    for w in payload["warnings"]:
        print(f"warning: {w}")
    if failed:
        print(f"vlad eval: {failed} images could not be read (listed in the JSON)", file=sys.stderr)
    return EXIT_PARTIAL if failed else EXIT_OK


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null (strict JSON has no NaN), numpy scalars become Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# ---------------------------------------------------------------------- serve


def run_serve(args: argparse.Namespace) -> int:
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise UsageError("--auth must look like user:password")
        auth = (user, password)
    require("gradio", "ui", what="the web UI")
    from webui.app import build_app, launch

    demo = build_app(
        scorer=args.scorer,
        backbone=args.backbone,
        lvlm=args.lvlm,
        device=args.device,
        profile=args.profile,
        adapter=args.adapter,
    )
    print(f"vlad web UI on http://{args.host}:{args.port}", flush=True)
    launch(demo, host=args.host, port=args.port, auth=auth)
    return EXIT_OK
