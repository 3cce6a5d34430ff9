"""Scorer speed: images/s, peak memory, and the ratio of a scorer's time per image to one bare backbone forward.

Both are measured in the same run, on the same device, batch size and input size, so the ratio is meaningful even
where absolute numbers are not. ``random:`` backbones work offline (weights do not change speed). Any ``--size`` that
is a multiple of the patch size works: the bare forward is the backbone's own visual forward with its positional
embedding re-gridded to that size (what every scorer runs), without any scorer work.

    python benchmarks/speed.py --backbone random:ViT-B-16-plus-240 --scorer winclip --size 240

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _time(fn, repeats: int, device: str) -> float:  # noqa: ANN001
    import torch

    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scorer", default="winclip")
    p.add_argument("--backbone", default="random:ViT-B-16-plus-240")
    p.add_argument("--size", type=int, default=None, help="input side in pixels (default: the scorer's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--refs", type=int, default=0, help="number of (random) normal references: few-shot mode")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra scorer option, e.g. --set detector=none (values parsed as JSON when possible)",
    )
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from vlad.scorers import get_scorer

    torch.manual_seed(0)
    extra = _options(args.set)
    if args.scorer == "filo":
        extra.setdefault("detector", "none")  # the detector's cost is not the scorer's; measure it separately
    scorer = get_scorer(
        args.scorer,
        backbone=args.backbone,
        device=args.device,
        precision=args.precision,
        image_size=args.size,
        batch_size=args.batch,
        **extra,
    )
    if args.scorer == "laft" or scorer.transductive:
        args.refs = max(args.refs, 2)  # laft needs references; musc needs other batch members
    rng = np.random.default_rng(0)
    size = scorer.image_size
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(args.batch)]
    if args.refs:
        scorer.fit([Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(args.refs)])
    backbone = scorer.backbone
    device = backbone.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    x = backbone.preprocess(images, size)

    with torch.no_grad():
        bare = _time(lambda: backbone.forward_visual(x), args.repeats, device)
    full = _time(lambda: scorer.score_many(images, "object"), args.repeats, device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    out = {
        "scorer": args.scorer,
        "backbone": backbone.spec,
        "size": size,
        "batch": args.batch,
        "refs": args.refs,
        "options": extra,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": str(backbone.dtype).removeprefix("torch."),
        "images_per_s": round(args.batch / full, 3),
        "ms_per_image": round(1000 * full / args.batch, 2),
        "bare_forward_ms_per_image": round(1000 * bare / args.batch, 2),
        "overhead_ratio": round(full / bare, 3),
        "peak_gpu_mem_mb": None if peak is None else round(peak, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
