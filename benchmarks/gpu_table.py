"""The README's GPU table, in one run: ``speed.py`` for every scorer at fp16 with batch 1 and 16 on
ViT-B-16-plus-240 (240 px) and ViT-L-14-336 (each scorer's default size), random weights, plus ``throughput.py`` for
the per-image scorers at batch 16. Prints one JSON line per measurement and, at the end, the markdown table rows
(device, date, images/s, ms/image, peak GPU memory) to paste into README.md.

    python benchmarks/gpu_table.py --out gpu-results.jsonl

Needs a CUDA device; weights do not change speed, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKBONES = ("random:ViT-B-16-plus-240", "random:ViT-L-14-336")
BATCHES = (1, 16)


def _speed(scorer: str, backbone: str, batch: int) -> dict:
    import speed

    with contextlib.redirect_stdout(io.StringIO()):
        return speed.main(
            ["--scorer", scorer, "--backbone", backbone, "--batch", str(batch), "--device", "cuda"]
            + ["--precision", "fp16", "--repeats", "3"]
            + (["--set", "detector=none"] if scorer == "filo" else [])
        )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-results.jsonl", help="JSON lines written here as they are measured")
    p.add_argument("--scorers", default="winclip,crane,filo,laft,musc,anomalyclip")
    p.add_argument("--no-throughput", action="store_true")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script records GPU numbers only")
    sys.path.insert(0, str(HERE))
    rows: list[dict] = []
    with open(args.out, "w", encoding="utf-8") as fh:
        for backbone in BACKBONES:
            for scorer in args.scorers.split(","):
                for batch in BATCHES:
                    try:
                        row = _speed(scorer, backbone, batch)
                    except Exception as exc:  # one failure (e.g. out of memory) must not lose the others
                        row = {"scorer": scorer, "backbone": backbone, "batch": batch, "error": str(exc)[:300]}
                    rows.append(row)
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    print(json.dumps(row), flush=True)
    if not args.no_throughput:
        import throughput

        for scorer in ("winclip", "crane", "filo", "anomalyclip"):
            with contextlib.redirect_stdout(io.StringIO()):
                row = throughput.main(
                    ["--scorer", scorer, "--backbone", BACKBONES[0], "--batch", "16", "--n", "32"]
                    + ["--device", "cuda"]
                )
            print(json.dumps({"throughput": row}), flush=True)
    today = datetime.date.today().isoformat()
    name = torch.cuda.get_device_name()
    for r in rows:
        if "error" in r:
            print(f"| {today} | {name} | {r['scorer']} | {r['backbone']} | - | {r['batch']} | failed: {r['error']} |")
        else:
            print(
                f"| {today} | {name} | {r['scorer']} | {r['backbone']} | {r['size']} | {r['batch']} | "
                f"{r['images_per_s']} | {r['ms_per_image']} | {r['peak_gpu_mem_mb']} |"
            )
    return rows


if __name__ == "__main__":
    main()
