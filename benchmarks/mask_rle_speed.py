"""COCO RLE encoding speed: ``rfdetr_core.mask_rle.encode_masks`` vs ``pycocotools.mask.encode``.

100 bool masks of 1920x1080 (random ellipses of 1-40 % of the image, as instance masks look), encoded by
both in the same process, interleaved, best of ``--repeats``. pycocotools' time includes the Fortran-order
``[H, W, N]`` uint8 copy it needs (``Detections.to_coco`` had to make it). The outputs are checked equal.

    uv run --frozen python benchmarks/mask_rle_speed.py [--masks 100] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch


def make_masks(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """``[n, h, w]`` bool ellipses covering 1-40 % of the image each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:h, :w]
    out = np.empty((n, h, w), dtype=bool)
    for i in range(n):
        area = rng.uniform(0.01, 0.4) * h * w
        ry = np.sqrt(area / np.pi * rng.uniform(0.5, 2.0))
        rx = area / np.pi / ry
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        out[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return out


def main() -> None:
    from pycocotools import mask as mask_utils

    from rfdetr_core.mask_rle import encode_masks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    masks = make_masks(args.masks, 1080, 1920)

    def ours():
        return encode_masks(masks)

    def reference():
        return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))

    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))

    def reference_encode_only():
        return mask_utils.encode(fortran)

    assert [r["counts"] for r in ours()] == [r["counts"] for r in reference()], "outputs differ"
    runs = {
        "ours": ours,
        "pycocotools": reference,
        "pycocotools, input already [H,W,N] F-order": reference_encode_only,
    }
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"numpy {np.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{args.masks} masks of 1920x1080, best of {args.repeats}:")
    for name, t in best.items():
        print(f"  {name:45s} {t * 1e3:8.1f} ms  ({t / best['ours']:.2f}x ours)")


if __name__ == "__main__":
    main()
