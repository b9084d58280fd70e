"""CPU latency of an AOTInductor package (``rfdetr-export MODEL --aoti``) against eager PyTorch, same weights,
same process: ``RFDETR.from_file(package).predict`` vs ``RFDETR.from_file(checkpoint).predict`` end to end, and
the runner alone (model only: the deploy tuple from a normalised batch).

    python benchmarks/aoti_vs_eager.py CHECKPOINT PACKAGE [--batches 1,4] [--threads 2] [--repeats 15] [--json F]

The package must hold the checkpoint's weights (made from it with ``--aoti --dynamic-batch``). One 640x480 RGB
image (the coco128 photo when present, else seeded noise), ``threshold=0.5``. After 3 warm-up calls of each side,
``--repeats`` rounds run each side once, alternating which goes first; per round ratio = package / eager, the
median ratio is printed with both medians. Cold start: seconds to load each side in this process (the package's
first load includes importing inductor's runtime; a second process would load as fast).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cpu_latency import source_image


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("package")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from rfdetr_core import RFDETR

    start = time.perf_counter()
    eager = RFDETR.from_file(args.checkpoint, device="cpu")
    load_eager = time.perf_counter() - start
    start = time.perf_counter()
    aoti = RFDETR.from_file(args.package)
    load_aoti = time.perf_counter() - start
    if aoti.runner.card.variant != eager.card.variant:
        raise SystemExit(f"{args.package} is a {aoti.runner.card.variant}, {args.checkpoint} a {eager.card.variant}")
    image = source_image()
    h, w = eager.resolution
    result = {
        "variant": eager.card.variant,
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "load_seconds": {"eager": load_eager, "aoti": load_aoti},
        "rows": [],
    }
    print(f"{eager.card.variant} @{h}x{w}, {args.threads} threads, torch {torch.__version__}")
    print(f"load: eager {load_eager:.2f} s, package {load_aoti:.2f} s")
    print("batch  what        eager ms  package ms  ratio (median of rounds)")
    for batch in [int(b) for b in args.batches.split(",")]:
        images = [image] * batch
        normalised = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(batch))
        cases = {
            "end to end": (
                lambda x=images: eager.predict(x, threshold=0.5),
                lambda x=images: aoti.predict(x, threshold=0.5),
            ),
            "model only": (lambda x=normalised: eager.runner(x), lambda x=normalised: aoti.runner(x)),
        }
        for what, (run_eager, run_aoti) in cases.items():
            for _ in range(3):
                run_eager(), run_aoti()
            times = {"eager": [], "aoti": []}
            for r in range(args.repeats):
                order = [("eager", run_eager), ("aoti", run_aoti)]
                for name, fn in order if r % 2 == 0 else order[::-1]:
                    times[name].append(_timed(fn))
            ratio = statistics.median(a / e for a, e in zip(times["aoti"], times["eager"], strict=True))
            row = {
                "batch": batch,
                "what": what,
                "eager_ms": statistics.median(times["eager"]),
                "aoti_ms": statistics.median(times["aoti"]),
                "ratio": ratio,
            }
            result["rows"].append(row)
            print(f"{batch:5d}  {what:10s}  {row['eager_ms']:8.1f}  {row['aoti_ms']:10.1f}  {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
