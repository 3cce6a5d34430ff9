"""Overlay rendering cost: seconds and memory of :func:`vlad.viz.render_result` on a large synthetic input.

Memory is measured two ways: the growth of the process's peak resident set while rendering (Linux: the peak mark is
reset just before, so building the input does not count) and tracemalloc's peak (numpy and Python allocations only).
Run in a fresh process:

    python benchmarks/overlay.py --side 4200 [--full-res]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import time
import tracemalloc

import numpy as np
from PIL import Image


def _status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in MB, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4200, help="input width and height in pixels")
    parser.add_argument("--full-res", action="store_true", help="render at the input's size")
    args = parser.parse_args()

    from vlad.regions import find_regions
    from vlad.result import AnomalyResult
    from vlad.viz import render_legend, render_result

    side = args.side
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    axis = np.arange(side, dtype=np.float32) / side
    amap = np.exp(-((axis[:, None] - 0.3) ** 2 + (axis[None, :] - 0.3) ** 2) / 0.002).astype(np.float32)
    amap[int(0.6 * side) : int(0.65 * side), int(0.7 * side) : int(0.72 * side)] = 0.8
    mask = amap >= 0.5
    result = AnomalyResult(
        0.8, 0.7, amap, mask, True, 0.6, 0.5, regions=find_regions(amap, mask), meta={"pixel_scale": 1.0}
    )
    gc.collect()
    _reset_peak_rss()
    rss_before = _status_mb("VmRSS")
    start = time.perf_counter()
    out = render_result(image, result, full_res=args.full_res)
    seconds = time.perf_counter() - start
    rss_peak = _status_mb("VmHWM")
    start = time.perf_counter()
    render_legend(result, overlay_size=out.size)
    legend_seconds = time.perf_counter() - start
    start = time.perf_counter()
    out.save(io.BytesIO(), format="PNG")
    save_seconds = time.perf_counter() - start
    tracemalloc.start()
    render_result(image, result, full_res=args.full_res)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    growth = None if rss_before is None or rss_peak is None else round(rss_peak - rss_before)
    print(
        json.dumps(
            {
                "input": [side, side],
                "overlay": list(out.size),
                "render_s": round(seconds, 3),
                "legend_s": round(legend_seconds, 3),
                "png_save_s": round(save_seconds, 3),
                "rss_growth_mb": growth,
                "tracemalloc_peak_mb": round(traced_peak / 2**20),
            }
        )
    )


if __name__ == "__main__":
    main()
