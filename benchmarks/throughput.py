"""End-to-end throughput of ``vlad detect``: images/s, peak RSS, post-processing time, and the ratio to the
scorer-only rate of ``benchmarks/speed.py``, all measured in one run on the same machine.

``vlad detect`` runs as a subprocess (the real command: decoding, scoring, regions, overlays, legends, report rows)
on generated images, twice: on N images and on 2N. The steady-state rate comes from the 2N run: images finished
between the first and the last overlay written, over the time between them, so the model load and process start
(reported as ``startup_s``, the time to the first overlay) do not count. Peak RSS is measured for both runs, so a
run that holds images in memory shows up as RSS growing with N. ``small`` images are at the model's input size; ``4k``
images are 4200 x 4200 (overlays bounded at 2048 px, as by default).

    python benchmarks/throughput.py --scorer winclip --backbone random:tiny --n 8
    python benchmarks/throughput.py --scorer crane --backbone random:ViT-B-16 --n 16 --kinds small

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
SIDES = {"4k": 4200}


def _image(side: int, seed: int) -> object:
    """A smooth random texture with a bright patch (compresses well, so the PNG stays small and quick to decode)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    base = 128 + 50 * np.sin(xx / (7 + seed % 5)) * np.cos(yy / 11)
    img = np.repeat(base[..., None], 3, axis=-1)
    y, x = rng.integers(0, side - side // 10, 2)
    img[y : y + side // 20, x : x + side // 20] = (250, 40, 40)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _make_images(folder: Path, side: int, n: int) -> None:
    folder.mkdir(parents=True)
    first = folder / "img_000.png"
    _image(side, 0).save(first)  # type: ignore[attr-defined]
    for i in range(1, n):  # copies: decoding cost is the same, generating them is not
        shutil.copyfile(first, folder / f"img_{i:03d}.png")


def _run_detect(folder: Path, out: Path, args: argparse.Namespace) -> dict:
    """Run ``vlad detect`` on a folder; wall seconds, peak RSS (MiB) of that process, and the report rows."""
    cmd = [sys.executable, "-m", "vlad.cli", "detect", str(folder), "--object", "part", "--scorer", args.scorer]
    cmd += ["--backbone", args.backbone, "--batch-size", str(args.batch), "--out", str(out), "--format", "json"]
    cmd += ["--device", args.device] + (["--tile", args.tile] if args.tile else [])
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"vlad detect failed: {stderr.strip().splitlines()[-1:]}")
    rss = usage.ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else usage.ru_maxrss / 1024
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    done = sorted(Path(r["overlay"]).stat().st_mtime for r in rows if r.get("overlay"))
    return {"wall_s": wall, "peak_rss_mb": rss, "rows": rows, "done": done, "start": start}


def _mean_timing(rows: list[dict], key: str) -> float:
    values = [r["timings"].get(key, 0.0) for r in rows if r.get("timings")]
    return round(1000 * sum(values) / max(len(values), 1), 2)


def _kind(kind: str, side: int, work: Path, args: argparse.Namespace) -> dict:
    small, large = work / f"{kind}_n", work / f"{kind}_2n"
    _make_images(small, side, args.n)
    _make_images(large, side, 2 * args.n)
    one = _run_detect(small, work / f"out_{kind}_n", args)
    two = _run_detect(large, work / f"out_{kind}_2n", args)
    done, first = two["done"], args.batch  # overlays are written a batch at a time: count from the first batch's end
    if len(done) <= first:
        raise SystemExit(f"only {len(done)} overlays for batches of {first}: no steady-state rate (raise --n)")
    steady = (len(done) - first) / max(done[-1] - done[first - 1], 1e-9)
    rows = two["rows"]
    return {
        "side": side,
        "images_per_s": round(steady, 3),
        "startup_s": round(done[first - 1] - two["start"], 2),
        "wall_s_2n": round(two["wall_s"], 2),
        "peak_rss_mb_n": round(one["peak_rss_mb"], 1),
        "peak_rss_mb_2n": round(two["peak_rss_mb"], 1),
        "rss_ratio_2n_over_n": round(two["peak_rss_mb"] / one["peak_rss_mb"], 3),
        "model_ms_per_image": _mean_timing(rows, "model"),
        "postprocess_ms_per_image": _mean_timing(rows, "postprocess"),
        "failed": sum(1 for r in rows if r.get("error")),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scorer", default="winclip")
    p.add_argument("--backbone", default="random:tiny")
    p.add_argument("--n", type=int, default=8, help="images in the first run (the second has 2N)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--kinds", default="small,4k", help="comma-separated: small, 4k")
    p.add_argument("--tile", default=None, help="vlad detect --tile for the run (SIZE or auto)")
    args = p.parse_args(argv)
    if args.scorer in ("laft", "musc"):
        raise SystemExit(f"{args.scorer} needs references or batch members; benchmark it with speed.py")
    sys.path.insert(0, str(HERE))
    import speed

    with contextlib.redirect_stdout(io.StringIO()):  # one JSON line: this benchmark's
        scorer_only = speed.main(
            ["--scorer", args.scorer, "--backbone", args.backbone, "--batch", str(args.batch), "--device", args.device]
        )
    out: dict = {"scorer": args.scorer, "backbone": args.backbone, "batch": args.batch, "n": args.n, "tile": args.tile}
    out["scorer_only_images_per_s"] = scorer_only["images_per_s"]
    with tempfile.TemporaryDirectory(prefix="vlad-throughput-") as tmp:
        for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
            if kind not in ("small", *SIDES):
                raise SystemExit(f"unknown kind {kind!r}; allowed: small, {', '.join(SIDES)}")
            side = scorer_only["size"] if kind == "small" else SIDES[kind]
            out[kind] = _kind(kind, side, Path(tmp), args)
            out[kind]["ratio_to_scorer_only"] = round(out[kind]["images_per_s"] / out["scorer_only_images_per_s"], 3)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
