"""Time of the host half of post-processing (``rfdetr_core.postprocess.finish_detections``) on one device.

    python benchmarks/host_half_speed.py [--device cuda] [--iters 50] [--json OUT.json]

The inputs are what the graph-safe half hands over for seg-medium (``K = 200`` pairs per image, ``108 x 108``
mask logits) for 480x640 sources, at batch 1 and 8, under two loads: ``typical`` (a threshold that keeps 20
detections per image) and ``all`` (threshold 0: every pair with a class). Masks are ``smooth`` (blobs: a few
runs per column, like trained masks) or ``noise`` (random-weight masks: many short runs, RLE's worst case).
Each case: median and p90 milliseconds over ``--iters`` calls after warm-up (CUDA: synchronised around each
call, as ``predict`` ends with the results on the host), ``mask_format="rle"``, ``host=True`` as ``predict``
calls it; with ``--profile`` also the number of device kernels and synchronising calls of one call.

To tell which change made it slower, run the same script on older sources in one GPU call:
``bash benchmarks/device_ab.sh prepare COMMIT`` here, ``bash benchmarks/device_ab.sh run 2
benchmarks/host_half_speed.py --device cuda`` there.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from rfdetr_core.postprocess import finish_detections

SOURCE = (480, 640)
K, MASK_HW = 200, (108, 108)


def inputs(batch: int, masks: str, device: torch.device, seed: int = 0):
    """``(scores [B, K] descending, labels [B, K], boxes [B, K, 4], mask logits [B, K, h, w])``."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, K, generator=g).sort(dim=1, descending=True).values
    labels = torch.randint(0, 80, (batch, K), generator=g)
    centre, size = torch.rand(batch, K, 2, generator=g), torch.rand(batch, K, 2, generator=g) * 0.5
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1).clamp(0, 1)
    if masks == "noise":
        logits = torch.randn(batch, K, *MASK_HW, generator=g)
    else:  # smooth blobs: coarse noise upsampled
        coarse = torch.randn(batch * K, 1, 6, 6, generator=g)
        logits = F.interpolate(coarse, size=MASK_HW, mode="bicubic", align_corners=False).view(batch, K, *MASK_HW)
    return tuple(t.to(device) for t in (scores, labels, boxes, logits))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _case(device, batch, masks, load):
    """The host half of one case as a call: ``finish_detections`` as ``predict`` calls it."""
    scores, labels, boxes, logits = inputs(batch, masks, device)
    threshold = float(scores[:, 19].min()) - 1e-6 if load == "typical" else 0.0  # typical: 20 per image

    def call():
        return finish_detections(
            scores, labels, boxes, logits, [SOURCE] * batch, threshold=threshold, mask_format="rle", host=True
        )

    return call


def time_case(device, batch, masks, load, iters, warmup=5) -> dict:
    call = _case(device, batch, masks, load)
    for _ in range(warmup):
        out = call()
    kept = sum(len(r["scores"]) for r in out)
    samples = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        samples.append(1000 * (time.perf_counter() - t0))
    samples.sort()
    return {
        "batch": batch,
        "masks": masks,
        "load": load,
        "detections": kept,
        "ms_median": statistics.median(samples),
        "ms_p90": samples[math.ceil(0.9 * len(samples)) - 1],  # nearest rank
    }


def profile_case(device, batch, masks, load) -> dict:
    """Kernels and synchronising runtime calls of one call (CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    call = _case(device, batch, masks, load)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        _sync(device)
    events = prof.key_averages()
    count = lambda names: sum(e.count for e in events if e.key in names)  # noqa: E731
    return {
        "kernel_launches": count({"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"}),
        "synchronisations": count({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy"}),
        "top_device_ms": sorted(
            ((e.key, e.self_device_time_total / 1000) for e in events if e.self_device_time_total > 0),
            key=lambda kv: -kv[1],
        )[:8],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--masks", default="smooth,noise")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}; {SOURCE[0]}x{SOURCE[1]} sources, K={K}, {MASK_HW} mask logits")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for masks in args.masks.split(","):
            for load in ("typical", "all"):
                row = time_case(device, batch, masks, load, args.iters)
                if args.profile and device.type == "cuda":
                    row.update(profile_case(device, batch, masks, load))
                rows.append(row)
                extra = (
                    f", {row['kernel_launches']} kernels, {row['synchronisations']} syncs"
                    if "kernel_launches" in row
                    else ""
                )
                print(
                    f"B={batch} {masks:6s} {load:7s}: {row['detections']:5d} masks, {row['ms_median']:8.2f} ms "
                    f"(p90 {row['ms_p90']:.2f}){extra}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
