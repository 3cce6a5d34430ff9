"""Ray engine scaling: images/s with 1 and with 2 workers (and the local engine) in one run, and their ratio.

Each measurement scores the same synthetic images through :func:`vlad.distributed.ray_inspect` on a local Ray (or
in this process, for ``local``). ``wall`` counts everything, actor start and model load included; ``steady`` counts
the images after the first batch, from its arrival to the last record's, which is what a long run sees. ``random:``
backbones work offline (weights do not change speed).

    python benchmarks/ray_scaling.py --scorer crane --backbone random:ViT-B-16 --size 224 --images 24

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _images(folder: Path, n: int, size: int) -> list[str]:
    import numpy as np
    from PIL import Image

    from vlad.data.synthetic import make_texture

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(make_texture(size, rng, kind="grid")).save(path)
        paths.append(str(path))
    return paths


def _detector(scorer: str, backbone: str, size: int | None):
    from vlad.pipeline import Detector

    return Detector(scorer, backbone=backbone, device="cpu", image_size=size, overlays=True)


def _measure(records, burst_s: float = 0.05) -> dict:
    """Images/s over the whole run (``wall``) and after the first batch came back (``steady``: the records of one
    batch arrive together, so the first burst -- records within ``burst_s`` of the first -- starts the clock)."""
    start = time.perf_counter()
    arrivals = []
    for _ in records:
        arrivals.append(time.perf_counter())
    wall = arrivals[-1] - start
    first_burst = sum(1 for t in arrivals if t - arrivals[0] <= burst_s)
    span = arrivals[-1] - arrivals[0]
    steady = (len(arrivals) - first_burst) / span if span > burst_s else float("nan")
    return {
        "images": len(arrivals),
        "wall_s": round(wall, 2),
        "first_record_s": round(arrivals[0] - start, 2),
        "images_per_s": round(len(arrivals) / wall, 3),
        "steady_per_s": round(steady, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scorer", default="crane")
    p.add_argument("--backbone", default="random:ViT-B-16")
    p.add_argument("--size", type=int, default=224, help="model input side (and the images' side)")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="default: what lets 2 workers and a decode task fit (at most 1)",
    )
    args = p.parse_args(argv)

    import ray

    from vlad.distributed import DECODE_CPUS, Group, RayOptions, ray_inspect

    cpus = os.cpu_count() or 1
    if args.cpus_per_worker is None:
        args.cpus_per_worker = min(1.0, math.floor(100 * (cpus - DECODE_CPUS) / 2) / 100)
    factory = functools.partial(_detector, args.scorer, args.backbone, args.size)
    result: dict = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}"}
    result.update({"cpus": cpus, **{k: v for k, v in vars(args).items()}})
    with tempfile.TemporaryDirectory() as tmp:
        group = Group("bench", "part", _images(Path(tmp), args.images, args.size))
        det = factory()
        result["local"] = _measure(det.iter_inspect(group.paths, "part"))
        ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            for workers in (1, 2):
                options = RayOptions(workers=workers, cpus_per_worker=args.cpus_per_worker)
                result[f"ray_{workers}"] = _measure(ray_inspect(factory, [group], options, batch_size=args.batch_size))
        finally:
            ray.shutdown()
    one, two = result["ray_1"], result["ray_2"]
    result["ratio_wall_2_over_1"] = round(two["images_per_s"] / one["images_per_s"], 3)
    result["ratio_steady_2_over_1"] = round(two["steady_per_s"] / one["steady_per_s"], 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
