"""What the ``vlad`` subcommands do (the parser lives in :mod:`vlad.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vlad.cli import EXIT_OK, EXIT_PARTIAL, UsageError, emit_json
from vlad.errors import ImageLoadError

# ---------------------------------------------------------------------- shared


def _progress(items: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    """A tqdm bar on stderr when it is a terminal and the job is not tiny."""
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="img", disable=total < 4 or not sys.stderr.isatty(), leave=False)


_SCORER_ONLY_OPTIONS = {"detector": ("filo",), "dattn": ("crane", "filo")}


def build_scorer(args: argparse.Namespace) -> Any:
    """The scorer the command line asks for; scorer-specific options are checked against the scorer."""
    from vlad.scorers import get_scorer

    extra: dict[str, Any] = {}
    for option, scorers in _SCORER_ONLY_OPTIONS.items():
        value = getattr(args, option, None)
        if value is None or (option == "detector" and getattr(args, "rules", None) and args.scorer not in scorers):
            continue  # --detector also serves the rules (required objects, "% of the part")
        if args.scorer not in scorers:
            raise UsageError(f"--{option} applies to the {' and '.join(scorers)} scorer(s), not {args.scorer!r}")
        extra[option] = value
    if getattr(args, "concepts", None):
        extra["concepts"] = args.concepts
    from vlad.train_cli import apply_adapter_option

    scorer = get_scorer(
        args.scorer,
        backbone=args.backbone,
        device=args.device,
        precision=args.precision,
        image_size=args.image_size,
        threshold=args.threshold,
        sensitivity=args.sensitivity,
        batch_size=args.batch_size,
        profile=getattr(args, "profile", None),
        **extra,
    )
    return apply_adapter_option(scorer, args)


def _expand_or_fail(inputs: Sequence[str], option: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    from vlad.data import expand_inputs

    files, problems = expand_inputs(inputs)
    if not files:
        detail = "; ".join(f"{p}: {msg}" for p, msg in problems) or "nothing given"
        raise UsageError(f"{option}: no images to read ({detail})")
    return files, problems


def run_scorers(args: argparse.Namespace) -> int:
    from vlad.scorers import list_scorers, scorer_class

    for name in list_scorers():
        doc = (scorer_class(name).__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {doc}")
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
        from vlad.rules.cli import load_rules_arg

        ruleset = load_rules_arg(args.rules)
        detector = None
        if getattr(args, "detector", None):
            from vlad.grounding import get_detector

            detector = get_detector(args.detector)
        return cls(ruleset, scorer, detector, getattr(args, "object_name", "object"))

    def apply(self, result: Any, image: Any) -> Any:
        from vlad.rules import apply_rules

        return apply_rules(result, self.ruleset, image=image, backbone=self.scorer.backbone, detector=self.detector,
                           object_name=self.object_name, scorer_hits=self.hits)  # fmt: skip


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


def _result_row(path: Path, result: Any, overlay: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    d = result.to_dict()
    return {
        "path": str(path),
        "object": args.object_name,
        **{k: d[k] for k in ("scorer", "backbone", "pred_score", "normalized_score", "pred_label", "verdict")},
        **{k: d[k] for k in ("threshold", "pixel_threshold", "threshold_source", "regions", "image_size")},
        "rule_hits": d["rule_hits"],
        "adapter": d["meta"].get("adapter"),
        "overlay": str(overlay) if overlay else None,
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
    stems: dict[str, int] = defaultdict(int)
    loaded: list[tuple[Path, Any]] = []
    for path in files:
        try:
            loaded.append((path, load_image(path)))
        except ImageLoadError as exc:
            rows.append(_error_row(path, str(exc), args))
    step = _chunks(scorer, len(loaded))
    for start in _progress(range(0, len(loaded), step), (len(loaded) + step - 1) // step, "detect"):
        batch = loaded[start : start + step]
        results = scorer.score_many([im for _, im in batch], args.object_name)
        for (path, image), result in zip(batch, results, strict=True):
            if rules is not None:
                result = rules.apply(result, image)
            overlay = None
            if not args.no_overlay:
                stems[path.stem] += 1
                suffix = "" if stems[path.stem] == 1 else f"_{stems[path.stem]}"
                overlay = out / f"{path.stem}{suffix}_overlay.png"
                render_result(image, result).save(overlay)
            row = _result_row(path, result, overlay, args)
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
        print(f"{name:40s} {r['verdict']:10s} {r['pred_score']:8.4f} {r['normalized_score']:6.3f} "
              f"{len(r['regions']):7d}  {where}")


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
    scorer: Any, samples: list[Any], name: str, args: argparse.Namespace, tracker: Any = None
) -> dict[str, Any]:
    from vlad.data import load_image, load_mask
    from vlad.metrics import compute_metrics

    size = args.eval_size or scorer.image_size
    loaded, failed = [], []
    for s in samples:
        try:
            loaded.append((s, load_image(s.path)))
        except ImageLoadError as exc:
            failed.append({"path": str(s.path), "error": str(exc)})
    scores, labels, maps, masks, pixel_ok = [], [], [], [], []
    step = _chunks(scorer, len(loaded))
    for start in _progress(range(0, len(loaded), step), (len(loaded) + step - 1) // step, name):
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
    keep = np.array(pixel_ok, bool)
    metrics = compute_metrics(
        np.array(scores), np.array(labels),
        np.stack(maps)[keep] if keep.any() else None, np.stack(masks)[keep] if keep.any() else None,
        legacy_aupro=args.legacy_aupro,
    )  # fmt: skip
    return {
        "metrics": metrics,
        "n_images": len(scores),
        "n_anomalous": int(np.sum(labels)),
        "n_without_mask": int((~keep).sum()),
        "failed": failed,
    }


def _print_metrics(per_category: dict[str, dict[str, float]], mean: dict[str, float]) -> None:
    keys = list(mean)
    print(f"{'category':16s} " + " ".join(f"{k:>13s}" for k in keys))
    for name, m in [*per_category.items(), ("mean", mean)]:
        print(f"{name:16s} " + " ".join(f"{100 * m.get(k, float('nan')):13.1f}" for k in keys))


def run_eval(args: argparse.Namespace) -> int:
    from vlad.data import load_dataset, prompt_name, reference_images
    from vlad.data.defects import prompt_overlap_warnings
    from vlad.metrics import macro_mean

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
        results[category] = _evaluate_category(scorer, _limit(items, args.limit, args.seed), name, args, tracker)
    per_category = {c: r["metrics"] for c, r in results.items()}
    mean = macro_mean(per_category)
    _print_metrics(per_category, mean)
    if tracker is not None:
        print(f"\nlanguage-model verdicts ({args.lvlm}):\n{tracker.format_table()}")
    failed = sum(len(r["failed"]) for r in results.values())
    payload = {
        "settings": {**scorer.describe(), "root": str(args.root), "layout": args.layout, "shots": args.shots,
                     "seed": args.seed, "limit": args.limit, "eval_size": args.eval_size or scorer.image_size,
                     "auxiliary_training_data": None, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "per_category": results,
        "mean": mean,
        "lvlm_verdicts": None if tracker is None else {"lvlm": args.lvlm, **tracker.summary()},
        "seconds": round(time.perf_counter() - started, 2),
        "warnings": list(scorer.warnings()) + prompt_overlap_warnings(scorer, samples),
    }  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(_clean(payload), indent=2), encoding="utf-8")
        print(f"metrics: {args.out}")
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
    try:
        from webui.app import build_app, launch
    except ImportError as exc:
        raise UsageError(f"the web UI needs gradio: pip install 'vlad[ui]' ({exc})") from exc
    demo = build_app(scorer=args.scorer, backbone=args.backbone, lvlm=args.lvlm, device=args.device)
    print(f"vlad web UI on http://{args.host}:{args.port}", flush=True)
    launch(demo, host=args.host, port=args.port, auth=auth)
    return EXIT_OK
