"""ONNX export against torch on the CPU: ms per image of each exportable scorer, run both ways in one process.

For each scorer the torch scorer and its export (:mod:`vlad.export`, run by :mod:`vlad.scorers.onnx_runtime`) score
the same images, alternately (medians of ``--repeats`` runs), with the same batch size and the same number of CPU
threads (``torch.set_num_threads`` and onnxruntime's ``intra_op_num_threads``), end to end: preprocessing, the
model, the map resized to each image, thresholds and regions. ``ratio`` is torch's time over onnxruntime's (above 1:
the export is faster), and ``max_map_diff`` the largest |difference| between the two maps at the input's
resolution. ``random:`` backbones run offline (weights do not change speed).

    python benchmarks/onnx_speed.py --backbone random:tiny --threads 2
    python benchmarks/onnx_speed.py --backbone random:ViT-B-16 --scorers crane laft --size 224 --images 4

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXPORTABLE = ("winclip", "crane", "anomalyclip", "filo", "laft")
NEEDS_REFERENCES = ("laft",)
EXTRA = {"filo": {"detector": "none"}}


def _time_both(first, second, repeats: int) -> tuple[float, float]:  # noqa: ANN001
    """Median seconds of each of two calls, run alternately (a load change on a shared machine hits both)."""
    import statistics

    first(), second()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def _images(n: int, side: int, seed: int) -> list:
    import numpy as np

    from vlad.data.synthetic import make_texture

    rng = np.random.default_rng(seed)
    return [make_texture(side, rng, kind="stripes") for _ in range(n)]


def _one(name: str, args: argparse.Namespace, images: list, refs: list | None, folder: Path) -> dict:
    import numpy as np

    from vlad.export import export_scorer
    from vlad.scorers import get_scorer

    options = {"backbone": args.backbone, "image_size": args.size, "batch_size": args.batch, **EXTRA.get(name, {})}
    torch_scorer = get_scorer(name, device="cpu", precision="fp32", **options)
    t0 = time.perf_counter()
    export_scorer(torch_scorer, "bottle", folder, references=refs)  # fits the references into torch_scorer too
    export_s = time.perf_counter() - t0
    onnx_scorer = get_scorer(name, backbone=f"onnx:{folder}", batch_size=args.batch, threads=args.threads)
    torch_results = torch_scorer.score_many(images, "bottle")
    onnx_results = onnx_scorer.score_many(images, "bottle")
    pairs = list(zip(torch_results, onnx_results, strict=True))
    diff = max(float(np.abs(a.anomaly_map - b.anomaly_map).max()) for a, b in pairs)

    def run_torch() -> object:
        return torch_scorer.score_many(images, "bottle")

    def run_onnx() -> object:
        return onnx_scorer.score_many(images, "bottle")

    torch_s, onnx_s = _time_both(run_torch, run_onnx, args.repeats)
    return {
        "torch_ms_per_image": round(1000 * torch_s / len(images), 2),
        "onnxruntime_ms_per_image": round(1000 * onnx_s / len(images), 2),
        "ratio": round(torch_s / onnx_s, 2),
        "max_map_diff": diff,
        "max_score_diff": max(abs(a.pred_score - b.pred_score) for a, b in pairs),
        "references": len(refs or ()),
        "export_s": round(export_s, 1),
        "model_mb": round((folder / "model.onnx").stat().st_size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="random:tiny")
    parser.add_argument("--scorers", nargs="+", default=list(EXPORTABLE), choices=EXPORTABLE)
    parser.add_argument("--size", type=int, default=None, help="model input side (default: each scorer's)")
    parser.add_argument("--images", type=int, default=8, help="images scored per repeat")
    parser.add_argument("--side", type=int, default=256, help="side of the synthetic input images")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--refs", type=int, default=0, help="few-shot references (laft always gets at least 3)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: torch's count)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each (medians are reported)")
    args = parser.parse_args()

    import logging

    import onnxruntime
    import torch

    logging.disable(logging.WARNING)  # "random weights" on every build
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    images = _images(args.images, args.side, seed=0)
    out: dict = {
        "backbone": args.backbone,
        "threads": args.threads,
        "images": args.images,
        "image_side": args.side,
        "batch": args.batch,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".replace("  ", " "),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "scorers": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scorers:
            n_refs = max(args.refs, 3) if name in NEEDS_REFERENCES else args.refs
            refs = _images(n_refs, args.side, seed=1) if n_refs else None
            out["scorers"][name] = _one(name, args, images, refs, Path(tmp) / name)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
