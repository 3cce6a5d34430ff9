"""What the ``vlad`` subcommands do (the parser lives in :mod:`vlad.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import vlad
from vlad._optional import require
from vlad.cli_common import EXIT_OK, EXIT_PARTIAL, UsageError, build_scorer, emit_json
from vlad.errors import ImageLoadError

# ---------------------------------------------------------------------- shared


def _progress(n_items: int, step: int, command: str, label: str = "") -> Iterator[int]:
    """Batch starts ``range(0, n_items, step)`` with progress on stderr, counted in images.

    On a terminal: a tqdm bar (none for tiny jobs). Otherwise (logs, CI, pipes): a line such as ``eval: bottle 40/83``
    about every 10 %, never one per image.
    """
    if sys.stderr.isatty():
        from tqdm import tqdm

        desc = f"{command} {label}".strip()
        with tqdm(total=n_items, desc=desc, unit="img", disable=n_items < 4, leave=False) as bar:
            for start in range(0, n_items, step):
                yield start
                bar.update(min(step, n_items - start))
        return
    prefix = f"{command}: {label} " if label else f"{command}: "
    tenths = 0
    for start in range(0, n_items, step):
        yield start
        done = min(start + step, n_items)
        if 10 * done // n_items > tenths:
            tenths = 10 * done // n_items
            print(f"{prefix}{done}/{n_items}", file=sys.stderr, flush=True)


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


# ---------------------------------------------------------------------- rules


class RulesInForce:
    """``--rules`` for one run: concept rules configure the scorer once, the others act on each result."""

    def __init__(self, ruleset: Any, scorer: Any, detector: Any, object_name: str) -> None:
        from vlad.rules import configure_scorer

        self.ruleset, self.scorer, self.detector, self.object_name = ruleset, scorer, detector, object_name
        self.hits = configure_scorer(scorer, ruleset, object_name=object_name)

    @classmethod
    def from_args(cls, args: argparse.Namespace, scorer: Any) -> RulesInForce | None:
        if not getattr(args, "rules", None):
            return None
        from vlad.rules import load_rules_arg

        ruleset = load_rules_arg(args.rules)
        detector = None
        if getattr(args, "detector", None):
            from vlad.grounding import get_detector

            detector = get_detector(args.detector)
        return cls(ruleset, scorer, detector, getattr(args, "object_name", "object"))

    def apply(self, result: Any, image: Any) -> Any:
        from vlad.rules import apply_rules

        return apply_rules(
            result,
            self.ruleset,
            image=image,
            backbone=self.scorer.backbone,
            detector=self.detector,
            object_name=self.object_name,
            scorer_hits=self.hits,
        )


# ---------------------------------------------------------------------- detect


def _load_references(refs: Sequence[str]) -> list[Any]:
    from vlad.data import load_image

    files, _ = _expand_or_fail(refs, "--refs")
    try:
        return [load_image(f) for f in files]
    except ImageLoadError as exc:
        raise UsageError(f"--refs: {exc}") from exc


def _error_row(path: Path, message: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"path": str(path), "object": args.object_name, "scorer": args.scorer, "error": message}


def _result_row(
    path: Path, result: Any, overlay: Path | None, args: argparse.Namespace, map_path: Path | None = None
) -> dict[str, Any]:
    d = result.to_dict()
    return {
        "path": str(path),
        "object": args.object_name,
        **{k: d[k] for k in ("scorer", "backbone", "pred_score", "normalized_score", "pred_label", "verdict")},
        **{k: d[k] for k in ("threshold", "pixel_threshold", "threshold_source", "regions", "image_size")},
        "rule_hits": d["rule_hits"],
        "adapter": d["meta"].get("adapter"),
        "overlay": str(overlay) if overlay else None,
        "map": str(map_path) if map_path else None,
        "timings": d["timings"],
        "warnings": d["warnings"],
        "error": None,
    }


def _chunks(scorer: Any, n: int) -> int:
    """Images per scoring call: a transductive scorer (musc) sees the whole set at once."""
    return max(n, 1) if getattr(scorer, "transductive", False) else scorer.batch_size


def _score_files(
    scorer: Any, files: list[Path], args: argparse.Namespace, out: Path, rules: Any = None
) -> list[dict[str, Any]]:
    from vlad.data import load_image
    from vlad.viz import render_result

    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    loaded: list[tuple[Path, Any]] = []
    for path in files:
        try:
            loaded.append((path, load_image(path)))
        except ImageLoadError as exc:
            rows.append(_error_row(path, str(exc), args))
    step = _chunks(scorer, len(loaded))
    for start in _progress(len(loaded), step, "detect"):
        batch = loaded[start : start + step]
        results = scorer.score_many([im for _, im in batch], args.object_name)
        for (path, image), result in zip(batch, results, strict=True):
            if rules is not None:
                result = rules.apply(result, image)
            name = _unique_name(path.stem, used)  # the same name for the overlay and the map of one image
            overlay = None
            if not args.no_overlay:
                overlay = out / f"{name}_overlay.png"
                render_result(image, result).save(overlay)
            map_path = None
            if getattr(args, "save_maps", False):
                map_path = _save_map(out / "maps" / f"{name}.npy", result.anomaly_map)
            row = _result_row(path, result, overlay, args, map_path)
            if getattr(args, "explain", False):
                from vlad.explain.cli import explain_row

                row.update(explain_row(image, result, args.object_name, args, backbone=scorer.backbone))
            rows.append(row)
    order = {str(p): i for i, p in enumerate(files)}
    return sorted(rows, key=lambda r: order[r["path"]])


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
    if getattr(args, "explain", False):
        from vlad.explain.cli import check_explain_args, reset_backends

        check_explain_args(args)
        reset_backends()
    files, problems = _expand_or_fail(args.inputs, "inputs")
    refs = _load_references(args.refs) if args.refs is not None else None
    scorer = build_scorer(args)
    rules = RulesInForce.from_args(args, scorer)
    if refs:
        scorer.fit(refs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [_error_row(p, msg, args) for p, msg in problems] + _score_files(scorer, files, args, out, rules)
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
    scorer: Any,
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
    from vlad.data import load_image, load_mask
    from vlad.metrics import compute_image_metrics, compute_pixel_metrics
    from vlad.metrics._summary import PIXEL_METRICS

    size = args.eval_size or scorer.image_size
    loaded, failed = [], []
    for s in samples:
        try:
            loaded.append((s, load_image(s.path)))
        except ImageLoadError as exc:
            failed.append({"path": str(s.path), "error": str(exc)})
    scores, labels, maps, masks, pixel_ok, images = [], [], [], [], [], []
    used: dict[Path, set[str]] = defaultdict(set)
    step = _chunks(scorer, len(loaded))
    category = samples[0].category if samples else name
    for start in _progress(len(loaded), step, "eval", category):
        batch = loaded[start : start + step]
        for (s, image), result in zip(batch, scorer.score_many([im for _, im in batch], name), strict=True):
            if tracker is not None:
                from vlad.explain.cli import explain_row

                row = explain_row(image, result, name, args, backbone=scorer.backbone)
                tracker.add(s.category, s.label, row["report"])
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
    scorer = build_scorer(args)
    if getattr(args, "rules", None):
        # concept rules change prompts / features and so the scores; region and verdict rules change labels only,
        # which the threshold-free metrics below do not read
        RulesInForce.from_args(args, scorer)
    tracker = None
    if args.lvlm:
        from vlad.explain.cli import check_explain_args, reset_backends
        from vlad.explain.verdicts import VerdictTracker

        check_explain_args(args)
        reset_backends()
        tracker = VerdictTracker()
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for category, items in sorted(by_category.items()):
        name = prompt_name(category)
        if args.shots > 0:
            scorer.fit(reference_images(args.root, args.layout, category, args.shots, seed=args.seed))
        else:
            scorer.clear_references()
        picked = _limit(items, args.limit, args.seed)
        results[category] = _evaluate_category(scorer, picked, name, args, tracker, maps_dir)
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
