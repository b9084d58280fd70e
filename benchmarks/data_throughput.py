"""Throughput and memory of the rfdetr-train data pipeline (CPU only).

0. Per-sample cost of the training pipeline against upstream ``rfdetr`` 1.11.2 (its ``CocoDetection`` with
   ``include_masks=True`` and its default square training transforms at the same size), same images, same
   process, one thread, rounds alternating between the two; the best round of each is reported.
1. Images/s of the training pipeline (built-in upstream recipe: flip, resize or shortest-side resize +
   crop; lazy masks; collate) on ``coco128_seg``'s train split at 432 px with 0, 1 and 2 loader workers;
   ratios against 0 workers, measured in this process. Also the share of time the consumer waited.
2. Resident-memory growth of this process while it iterates N batches (workers=0, so every decode happens
   here) over the synthetic dataset and over one 10x larger (a real, separately generated 3200-image
   split). Lazy decoding means the growth must not depend on the dataset size (within 10%).

Usage::

    uv run --frozen python benchmarks/data_throughput.py [--data ../shared/datasets/coco128_seg]
        [--batches 40] [--mem-batches 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; psutil elsewhere), after returning freed heap
    pages to the OS (glibc ``malloc_trim``) so that it counts live memory, not allocator slack."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS then includes free heap pages
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss / 2**20


def throughput(data, workers: int, batches: int, batch_size: int, resolution: int) -> dict:
    from rfdetr_train.data import build_train_loader

    loader = build_train_loader(data, resolution=resolution, size_multiple=24, batch_size=batch_size,
                                seed=0, workers=workers, multi_scale=False, min_batches=batches + 2)  # fmt: skip
    it = iter(loader)
    next(it)  # warm-up: worker start-up and first decodes are not throughput
    next(it)
    loader.timing.reset()
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = next(it)
        n += b.images.shape[0]
    dt = time.perf_counter() - t0
    del it, loader
    gc.collect()
    return {"workers": workers, "images": n, "seconds": round(dt, 3), "images_per_s": round(n / dt, 2)}


def per_sample_vs_upstream(path: Path, resolution: int, rounds: int = 3) -> dict | None:
    """Seconds per training sample: ours vs upstream rfdetr's dataset (None if rfdetr is not installed)."""
    import warnings

    try:
        from rfdetr.datasets.coco import CocoDetection, make_coco_transforms_square_div_64
    except ImportError:
        return None
    from rfdetr_train.data import SampleKey, TrainTransform, load_dataset

    warnings.filterwarnings("ignore")
    data = load_dataset(path)
    ours = data.dataset("train", TrainTransform(), (resolution, resolution), seed=0)
    tf = make_coco_transforms_square_div_64(
        "train", resolution, multi_scale=False, patch_size=12, num_windows=2
    )
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its index build
        upstream = CocoDetection(str(path), str(path / "train.json"), transforms=tf, include_masks=True,
                                 remap_category_ids=True)  # fmt: skip
    n = len(ours)
    assert n == len(upstream)
    best = {"ours": float("inf"), "upstream": float("inf")}
    for r in range(rounds):
        t = time.perf_counter()
        for i in range(n):
            ours[SampleKey(i, r, (resolution, resolution))]
        best["ours"] = min(best["ours"], (time.perf_counter() - t) / n)
        t = time.perf_counter()
        for i in range(n):
            upstream[i]
        best["upstream"] = min(best["upstream"], (time.perf_counter() - t) / n)
    return {"images": n, "ours_ms": round(1000 * best["ours"], 1), "upstream_ms": round(1000 * best["upstream"], 1),
            "speedup": round(best["upstream"] / best["ours"], 2)}  # fmt: skip


def memory_growth(path: Path, batches: int, batch_size: int, resolution: int) -> dict:
    from rfdetr_train.data import build_train_loader, load_dataset

    gc.collect()
    before_load = rss_mb()
    data = load_dataset(path)
    loader = build_train_loader(data, resolution=resolution, size_multiple=24, batch_size=batch_size, seed=0,
                                workers=0, multi_scale=True)  # fmt: skip
    warmup = 30  # the allocator settles once most multi-scale sizes have been seen

    def batches_of(n):
        count = 0
        while True:
            for b in loader:
                yield b
                count += 1
                if count == n:
                    return

    for _b in batches_of(warmup):
        pass
    gc.collect()
    start = rss_mb()
    for _b in batches_of(batches):
        pass
    gc.collect()
    end = rss_mb()
    images = len(data.split("train").coco["images"])
    return {
        "dataset": str(path),
        "train_images": images,
        "rss_end_mb": round(end, 1),
        "rss_dataset_mb": round(start - before_load, 1),
        "rss_growth_mb": round(end - start, 1),
        "batches": batches,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/coco128_seg"))
    p.add_argument("--resolution", type=int, default=432)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mem-batches", type=int, default=150)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--mem-only", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mem_only:
        torch.set_num_threads(1)
        print(json.dumps(memory_growth(Path(args.mem_only), args.mem_batches, args.batch_size, 312)))
        return 0

    torch.set_num_threads(1)  # one core per process: worker scaling is then what it looks like
    from rfdetr_core.paths import datasets_dir
    from rfdetr_train.data import load_dataset
    from rfdetr_train.data.synthetic import GENERATOR_VERSION, generate, synthetic_dataset_dir

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(f"# data throughput  {env}")
    cmp = per_sample_vs_upstream(Path(args.data), args.resolution)
    if cmp is not None:
        print(
            f"\nper training sample, coco128_seg train ({cmp['images']} images), {args.resolution} px, 1 thread"
        )
        print("| pipeline | ms / sample | speed-up |")
        print("|---|---|---|")
        print(
            f"| upstream rfdetr 1.11.2 CocoDetection + default train transforms | {cmp['upstream_ms']} | 1.00x |"
        )
        print(f"| rfdetr-train InstanceDataset + TrainTransform | {cmp['ours_ms']} | {cmp['speedup']:.2f}x |")
    data = load_dataset(args.data)
    rows = [throughput(data, w, args.batches, args.batch_size, args.resolution) for w in args.workers]
    base = rows[0]["images_per_s"]
    print(f"\ncoco128_seg train, {args.resolution} px, batch {args.batch_size}, {args.batches} batches")
    print("| workers | images/s | vs 0 workers |")
    print("|---|---|---|")
    for r in rows:
        r["ratio"] = round(r["images_per_s"] / base, 2)
        print(f"| {r['workers']} | {r['images_per_s']:.1f} | {r['ratio']:.2f}x |")

    small = synthetic_dataset_dir(seed=0)
    big = datasets_dir(create=True) / f"synthetic-bench-v{GENERATOR_VERSION}-s0-x10"
    if not (big / "train.json").is_file():
        t = time.perf_counter()
        generate(big, seed=0, sizes={"train": 3200})
        print(f"(generated the 10x dataset in {time.perf_counter() - t:.0f} s)")
    # each measurement in a fresh process, so neither inherits the other's allocator state
    mem = []
    for path in (small, big):
        out = subprocess.run([sys.executable, __file__, "--mem-only", str(path), "--mem-batches",
                              str(args.mem_batches), "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        mem.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"\nresident memory while iterating {args.mem_batches} batches (workers=0, multi-scale around 312 px)"
    )
    print(
        "| dataset | train images | RSS of load_dataset (MiB) | RSS growth over the batches (MiB) | RSS at end (MiB) |"
    )
    print("|---|---|---|---|---|")
    for m in mem:
        name = Path(m["dataset"]).name
        print(
            f"| {name} | {m['train_images']} | {m['rss_dataset_mb']} | {m['rss_growth_mb']} | {m['rss_end_mb']} |"
        )
    a, b = mem[0]["rss_growth_mb"], mem[1]["rss_growth_mb"]
    rel = abs(b - a) / max(abs(a), abs(b), 1e-9)
    print(f"growth difference: {abs(b - a):.1f} MiB ({100 * rel:.0f}% of the larger)")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"env": env, "vs_upstream": cmp, "throughput": rows, "memory": mem}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
