"""``vlad eval``: a scorer on an MVTec AD / VisA / folder dataset: per-category metrics, macro mean, JSON."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import vlad
from vlad._argtypes import positive_int
from vlad.cli.common import (
    EXIT_OK,
    EXIT_PARTIAL,
    Progress,
    UsageError,
    add_engine_options,
    add_model_options,
    build_detector,
    check_options,
    engine_options,
    save_map,
    unique_name,
)


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
    lvlm_eval: Any = None,
    records: list[Any] | None = None,
) -> dict[str, Any]:
    """Scores one category and computes its metrics.

    Image metrics use every scored image; pixel metrics use the normal images (all-zero masks) and the anomalous images
    that have a mask, and are NaN with a ``pixel_metrics_note`` when no anomalous image has one. With ``maps_dir``,
    each raw map is saved at the input resolution as ``maps_dir/<category>/<defect>/<stem>.npy``. With ``lvlm_eval``
    (:class:`~vlad.explain.lvlm_eval.LVLMEvaluation`), each image's blind / grounded LVLM verdict is recorded too.
    ``records``: the samples' records when another engine scored them.
    """
    from vlad.data import load_image, load_mask
    from vlad.metrics import compute_image_metrics, compute_pixel_metrics
    from vlad.metrics._summary import PIXEL_METRICS

    size = args.eval_size or det.scorer.image_size
    scores, labels, maps, masks, pixel_ok, images, failed = [], [], [], [], [], [], []
    used: dict[Path, set[str]] = defaultdict(set)
    category = samples[0].category if samples else name
    if records is None:  # else scored already (--engine ray), in the order of samples
        records = det.inspect_many([str(s.path) for s in samples], name, progress=Progress("eval", category))
    for s, record in zip(samples, records, strict=True):
        if not record.ok:
            failed.append({"path": str(s.path), "error": record.error})
            continue
        result = record.result
        report = (record.explanation or {}).get("report")
        if tracker is not None:
            tracker.add(s.category, s.label, report)
        lvlm_row = {}
        if lvlm_eval is not None:
            image = load_image(s.path) if lvlm_eval.needs_image else None
            lvlm_row = lvlm_eval.observe(s.category, s.label, image=image, detector=result.pred_label, report=report)
        scores.append(result.pred_score)
        labels.append(s.label)
        maps.append(_resize_map(result.anomaly_map, size))
        masks.append(load_mask(s.mask_path, (size, size)) if s.mask_path else np.zeros((size, size), bool))
        pixel_ok.append(s.label == 0 or s.mask_path is not None)
        map_path = None
        if maps_dir is not None:
            folder = maps_dir / s.category / s.defect
            map_path = save_map(folder / f"{unique_name(s.path.stem, used[folder])}.npy", result.anomaly_map)
        images.append(
            {
                "path": str(s.path),
                "category": s.category,
                "label": int(s.label),
                "defect": s.defect,
                "pred_score": float(result.pred_score),
                "mask": str(s.mask_path) if s.mask_path else None,
                "map": str(map_path) if map_path else None,
                **lvlm_row,
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


def _check_json_out(out: str | None) -> None:
    """``--out`` must be a writable file path: checked before any model loads."""
    if not out:
        return
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; give the metrics JSON's file name, e.g. {path / 'metrics.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None


def _ray_records(
    det: Any, picked: dict[str, list[Any]], args: argparse.Namespace, options: Any, explain: Any, rules: Any
) -> dict[str, list[Any]]:
    """Every category's records, scored on a Ray actor pool (each category one group with its references)."""
    from vlad.data import prompt_name, reference_images
    from vlad.distributed import Group, ray_inspect

    groups = [
        Group(
            category,
            prompt_name(category),
            [str(s.path) for s in samples],
            reference_images(args.root, args.layout, category, args.shots, seed=args.seed) if args.shots > 0 else [],
        )
        for category, samples in picked.items()
    ]
    records: dict[str, list[Any]] = {g.key: [None] * len(g.paths) for g in groups}
    factory = functools.partial(build_detector, args, explain=explain, rules=rules)
    progress, total = Progress("eval", "all categories"), sum(len(g.paths) for g in groups)
    scorer = det.scorer
    remote = ray_inspect(factory, groups, options, transductive=scorer.transductive, batch_size=scorer.batch_size)
    for done, item in enumerate(remote, 1):
        records[item.group][item.record.index] = item.record
        progress(done, total)
    return records


def run_eval(args: argparse.Namespace) -> int:
    from vlad.data import load_dataset, prompt_name, reference_images
    from vlad.data.defects import prompt_overlap_warnings
    from vlad.metrics import macro_mean

    rules = check_options(args, has_references=args.shots > 0)
    engine = engine_options(args)
    _check_json_out(args.out)
    maps_dir = _eval_maps_dir(args)
    samples = load_dataset(args.root, args.layout, args.category, split="test")
    by_category: dict[str, list[Any]] = defaultdict(list)
    for s in samples:
        by_category[s.category].append(s)
    explain = tracker = lvlm_eval = None
    _check_lvlm_mode(args)
    if args.lvlm:
        from vlad.cli.chat import explain_options
        from vlad.explain.verdicts import VerdictTracker

        explain = explain_options(args)
        explain.check()
        tracker = VerdictTracker() if args.lvlm_mode != "blind" else None
    # concept rules change prompts / features and so the scores; region and verdict rules change labels only,
    # which the threshold-free metrics below do not read
    det = build_detector(args, explain=explain if tracker is not None else None, rules=rules)
    if args.lvlm:
        lvlm_eval = _lvlm_evaluation(args, det)
    scorer = det.scorer
    started = time.perf_counter()
    results: dict[str, Any] = {}
    picked = {c: _limit(items, args.limit, args.seed) for c, items in sorted(by_category.items())}
    remote = _ray_records(det, picked, args, engine, explain, rules) if engine is not None else {}
    for category, items in picked.items():
        name = prompt_name(category)
        if category in remote:
            pass  # scored on the Ray workers, which fitted the category's references
        elif args.shots > 0:
            det.fit(reference_images(args.root, args.layout, category, args.shots, seed=args.seed))
        else:
            det.clear_references()
        results[category] = _evaluate_category(
            det, items, name, args, tracker, maps_dir, lvlm_eval, remote.get(category)
        )
    images = [record for r in results.values() for record in r.pop("images")]
    per_category = {c: r["metrics"] for c, r in results.items()}
    mean = macro_mean(per_category)
    notes = {c: r["pixel_metrics_note"] for c, r in results.items() if r["pixel_metrics_note"]}
    _print_metrics(per_category, mean, notes)
    if lvlm_eval is not None:
        print(f"\nlanguage-model verdicts ({args.lvlm}, {args.lvlm_mode}):\n{lvlm_eval.format_tables()}")
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
        "lvlm_eval": None if lvlm_eval is None else {"lvlm": args.lvlm, **lvlm_eval.summary()},
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


def _check_lvlm_mode(args: argparse.Namespace) -> None:
    """``--lvlm-mode`` needs ``--lvlm``, and blind needs a model (checked before any model loads)."""
    if args.lvlm_mode is None:
        args.lvlm_mode = "grounded"
    elif not args.lvlm:
        raise UsageError(f"--lvlm-mode {args.lvlm_mode} needs --lvlm SPEC (a language model to ask)")
    if args.lvlm and args.lvlm_mode != "grounded":
        from vlad.explain.backends import parse_backend_spec

        if parse_backend_spec(args.lvlm).kind == "template":
            raise UsageError(
                f"--lvlm-mode {args.lvlm_mode} needs a language model (--lvlm openai:... or transformers:...); "
                "the template has no opinion of its own"
            )


def _lvlm_evaluation(args: argparse.Namespace, det: Any) -> Any:
    """The blind / grounded LVLM verdict collector; blind asks the pipeline's own backend when it has one."""
    from vlad.explain.backends import load_backend
    from vlad.explain.lvlm_eval import LVLMEvaluation

    backend = None
    if args.lvlm_mode in ("blind", "both"):
        explainer = det.explainer
        backend = explainer.backend() if explainer is not None else load_backend(args.lvlm, timeout=args.lvlm_timeout)
    return LVLMEvaluation(args.lvlm_mode, backend)


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


def register(subparsers: Any) -> dict[str, Any]:
    """Adds ``eval``; returns ``{"eval": handler}``."""
    from vlad.cli.adapters import add_adapter_option
    from vlad.cli.chat import add_lvlm_options
    from vlad.cli.rules import add_rules_option

    e = subparsers.add_parser("eval", help="evaluate a scorer on an MVTec AD / VisA / folder dataset")
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
    add_engine_options(e)
    add_adapter_option(e)
    add_rules_option(e)
    lvlm = e.add_argument_group("language-model verdicts (optional)")
    add_lvlm_options(lvlm)
    lvlm.add_argument(
        "--lvlm-mode",
        default=None,
        choices=["blind", "grounded", "both"],
        help="blind: the model sees only the photo and is asked yes/no; grounded (default): it reads vlad's "
        "evidence and reports its own verdict; both",
    )
    e.set_defaults(lvlm=None)

    return {"eval": run_eval}
