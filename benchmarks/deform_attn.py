"""Benchmark: CUDA deformable-attention kernel vs the pure-PyTorch path of torch.ops.rfdetr.ms_deform_attn.

Shapes are the decoder cross-attention of the segmentation variants (from the registry): one level of
``(res / patch)^2`` positions, ``ca_nheads`` heads of ``hidden_dim / ca_nheads`` channels, ``dec_n_points``
points; ``num_queries`` queries at inference, ``num_queries * group_detr`` in training. Both paths go
through the same public op, switched with ``RFDETR_DEFORM_ATTN``, in one process.

Each configuration is timed with CUDA events around every call (no host sync between calls, so the stream
stays busy as inside a model), median of ``--iters`` calls after ``--warmup`` calls.

    TORCH_CUDA_ARCH_LIST=9.0 python benchmarks/deform_attn.py --json out/deform_attn.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

import rfdetr_core  # noqa: F401  (registers torch.ops.rfdetr.*)
from rfdetr_core.ops import BACKEND_ENV, deform_attn_backend, ms_deform_attn_pytorch
from rfdetr_core.variants import get_variant

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def decoder_shape(variant: str, batch: int, training: bool) -> dict:
    """Cross-attention sizes of one variant's decoder."""
    v = get_variant(variant)
    grid = v.resolution // v.patch_size
    return {
        "variant": variant,
        "batch": batch,
        "queries": v.num_queries * (v.group_detr if training else 1),
        "heads": v.ca_nheads,
        "dim": v.hidden_dim // v.ca_nheads,
        "levels": len(v.projector_scale),
        "points": v.dec_n_points,
        "spatial_shapes": [grid, grid] * len(v.projector_scale),
    }


def make_inputs(shape: dict, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    b, q, m, d = shape["batch"], shape["queries"], shape["heads"], shape["dim"]
    lv, p = shape["levels"], shape["points"]
    hw = shape["spatial_shapes"]
    s = sum(hw[2 * i] * hw[2 * i + 1] for i in range(lv))
    value = torch.randn(b, s, m, d, device="cuda", dtype=dtype, generator=g)
    loc = torch.rand(b, q, m, lv, p, 2, device="cuda", dtype=dtype, generator=g)
    attn = torch.randn(b, q, m, lv * p, device="cuda", generator=g).softmax(-1).view(b, q, m, lv, p).to(dtype)
    grad = torch.randn(b, q, m * d, device="cuda", dtype=dtype, generator=g)
    return value, loc, attn, grad


def median_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def bench_one(shape: dict, dtype: torch.dtype, iters: int, warmup: int) -> dict:
    value, loc, attn, grad = make_inputs(shape, dtype)
    hw = shape["spatial_shapes"]
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    op = torch.ops.rfdetr.ms_deform_attn

    def forward():
        with torch.no_grad():
            op(value, hw, loc, attn)

    def forward_backward():
        out = op(leaves[0], hw, leaves[1], leaves[2])
        torch.autograd.grad(out, leaves, grad)

    row = dict(shape)
    outputs = {}
    for backend in ("pytorch", "cuda"):
        os.environ[BACKEND_ENV] = backend
        with torch.no_grad():
            outputs[backend] = op(value, hw, loc, attn).double()
        row[f"{backend}_fwd_ms"] = median_ms(forward, iters, warmup)
        row[f"{backend}_fwdbwd_ms"] = median_ms(forward_backward, iters, warmup)
    # Accuracy of both paths against float64 arithmetic on the same (rounded) inputs.
    ref = ms_deform_attn_pytorch(value.double(), hw, loc.double(), attn.double())
    for backend, out in outputs.items():
        row[f"{backend}_rel_l2"] = float((out - ref).norm() / ref.norm())
    row["fwd_speedup"] = row["pytorch_fwd_ms"] / row["cuda_fwd_ms"]
    row["fwdbwd_speedup"] = row["pytorch_fwdbwd_ms"] / row["cuda_fwdbwd_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["seg-nano", "seg-medium", "seg-2xlarge"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--json", help="write all rows and the environment here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    if args.iters < 200:
        parser.error("--iters must be at least 200")

    os.environ[BACKEND_ENV] = "cuda"
    assert deform_attn_backend() == "cuda"  # builds the kernel now, outside the timings
    env = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "iters": args.iters,
        "warmup": args.warmup,
    }
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    rows = []
    for variant in args.variants:
        for training in (False, True):
            for batch in args.batches:
                rows.append(
                    bench_one(
                        decoder_shape(variant, batch, training), DTYPES[args.dtype], args.iters, args.warmup
                    )
                )
                rows[-1]["phase"] = "train" if training else "eval"

    header = (
        f"{'variant':<12} {'phase':<5} {'B':>2} {'Q':>5} {'S':>5} | {'fwd torch':>9} {'fwd cuda':>9} {'ratio':>6} | "
        f"{'f+b torch':>9} {'f+b cuda':>9} {'ratio':>6} | err torch  err cuda"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        s = r["spatial_shapes"][0] * r["spatial_shapes"][1]
        print(
            f"{r['variant']:<12} {r['phase']:<5} {r['batch']:>2} {r['queries']:>5} {s:>5} | "
            f"{r['pytorch_fwd_ms']:>9.4f} {r['cuda_fwd_ms']:>9.4f} {r['fwd_speedup']:>5.2f}x | "
            f"{r['pytorch_fwdbwd_ms']:>9.4f} {r['cuda_fwdbwd_ms']:>9.4f} {r['fwdbwd_speedup']:>5.2f}x | "
            f"{r['pytorch_rel_l2']:>9.1e} {r['cuda_rel_l2']:>9.1e}"
        )
    slower = [r for r in rows if r["fwd_speedup"] <= 1 or r["fwdbwd_speedup"] <= 1]
    print(f"kernel faster at every shape: {not slower}  (times in ms, ratio = torch / cuda)")
    print("err: relative L2 error of the output against float64 arithmetic on the same inputs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
