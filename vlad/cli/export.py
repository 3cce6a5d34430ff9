"""``vlad export --format onnx``: one scorer for one product as ``DIR/model.onnx`` plus ``DIR/manifest.json``
(:mod:`vlad.export`); run it with ``vlad detect --backbone onnx:DIR``."""

from __future__ import annotations

import argparse
from typing import Any

from vlad._argtypes import positive_int
from vlad.cli.common import (
    EXIT_OK,
    UsageError,
    add_model_options,
    build_scorer,
    check_options,
    emit_json,
    load_references,
)


def run_export(args: argparse.Namespace) -> int:
    from vlad.export import DEFAULT_OPSET, FORMATS, check_export, export_scorer

    if args.export_format not in FORMATS:
        given = "is required" if args.export_format is None else f"{args.export_format!r} is not supported"
        raise UsageError(f"--format {given}; allowed: {', '.join(FORMATS)}")
    if args.opset is not None and args.opset < DEFAULT_OPSET:
        raise UsageError(f"--opset {args.opset}: the exporter needs opset {DEFAULT_OPSET} or later")
    check_options(args, has_references=bool(args.refs))
    options = {
        k: getattr(args, k)
        for k in ("backbone", "device", "precision", "profile", "detector", "dattn", "concepts", "tile")
        if getattr(args, k, None) is not None
    }
    check_export(args.scorer, args.object_name, args.out, options, has_references=bool(args.refs))
    refs = load_references(args.refs) if args.refs else None
    args.device, args.precision = "cpu", "fp32"
    scorer = build_scorer(args)
    manifest = export_scorer(scorer, args.object_name, args.out, references=refs, opset=args.opset or DEFAULT_OPSET)
    if args.json:
        emit_json(manifest)
        return EXIT_OK
    check = manifest["check"]
    print(
        f"exported {manifest['scorer']} ({manifest['backbone']}, {manifest['profile']} profile) for "
        f"{manifest['object']!r} with {manifest['references']} reference(s): {args.out}/model.onnx"
    )
    print(
        f"check against torch: max |score diff| {check['max_abs_score_diff']:.2g}, "
        f"max |map diff| {check['max_abs_map_diff']:.2g}; thresholds: {manifest['thresholds']['source']}"
    )
    for warning in manifest["warnings"]:
        print(f"warning: {warning}")
    print(
        f"run it: vlad detect IMAGES --scorer {manifest['scorer']} --object {manifest['object']} "
        f"--backbone onnx:{args.out}"
    )
    return EXIT_OK


def register(subparsers: Any) -> dict[str, Any]:
    """Adds ``export``; returns ``{"export": handler}``."""
    from vlad.cli.adapters import add_adapter_option

    p = subparsers.add_parser(
        "export",
        help="export a scorer for one product to ONNX (run it with --backbone onnx:DIR)",
        description="Trace the scorer's image graph for one product, with its prompts, concept transform, adapter "
        "and few-shot references baked in, to DIR/model.onnx, and write DIR/manifest.json (preprocessing, "
        "post-processing, thresholds, checksum). Run it with `vlad detect --backbone onnx:DIR` (onnxruntime, no "
        "torch). MuSc (transductive), FiLo with its detector and Crane+ D-Attn cannot be exported. See docs/export.md.",
    )
    p.add_argument("--format", dest="export_format", default=None, metavar="onnx", help="export format (onnx)")
    p.add_argument("--object", dest="object_name", default=None, help="the product the export is for, e.g. bottle")
    p.add_argument("--refs", nargs="+", default=None, help="normal reference images or folders (baked in)")
    p.add_argument("--out", default=None, help="folder to write model.onnx and manifest.json to")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    add_model_options(p)
    add_adapter_option(p)
    return {"export": run_export}
