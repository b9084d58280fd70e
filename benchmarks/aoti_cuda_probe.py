"""Where a CUDA AOTInductor package of the seg deploy network crashes: compile, load, run, each in its own process.

On an H200 (torch 2.11, 2026-12-07) ``RFDETR.optimize(compile="aoti")`` compiled the package and the process then
ended with a segmentation fault in torch's loader. This script takes the steps apart so a crash ends one child,
not the run, and its exit code (-11 for SIGSEGV) says which step it was:

    RFDETR_AOTI_CUDA=1 python benchmarks/aoti_cuda_probe.py [--variant seg-nano] [--dtype bf16] [--out DIR]

For each case (dynamic batch as ``optimize`` builds it, then a static batch of 1), in this order:
``compile`` (export + package, no load, plus the eager reference outputs for batch 1 and 3), ``load`` (a fresh
process: load the package, run it, compare with the reference, time the load and a call), ``compile+load``
(the same process that compiled loads it, as ``optimize`` did); on CUDA every load also captures the package's call
in a CUDA graph and replays it, as ``optimize`` does next. Every child runs under ``faulthandler``; the
summary prints each step's exit code and the load/compare lines. Needs CUDA and ``RFDETR_AOTI_CUDA=1``.

The comparison is meaningful in ``--dtype fp32`` only: on random weights bf16 picks other two-stage proposals than
the eager reference (near-ties), so whole rows of the outputs differ (torch 2.11, CPU, bf16 dynamic package:
max difference 0.3-0.98 of the largest reference value, while fp32 agrees to 1e-6); bf16 is the default because
it is what ``optimize`` packages and what crashed. ``--step`` runs one step in this process (CPU too).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only to try the script itself
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _deploy(variant: str, dtype: torch.dtype):
    """The network as ``optimize(compile="aoti")`` packages it, random weights from seed 0, and its resolution."""
    from rfdetr_core.deploy import DeployModel
    from rfdetr_core.factory import load_model

    torch.manual_seed(0)
    loaded = load_model(variant, None, None)
    network = loaded.model.to(device=DEVICE, dtype=dtype).eval()
    return DeployModel(network, loaded.card, postprocess=False).eval(), loaded.card.resolution


def _inputs(resolution, dtype) -> dict[int, torch.Tensor]:
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    g = torch.Generator().manual_seed(7)
    return {b: torch.randn(b, 3, h, w, generator=g).to(DEVICE, dtype) for b in (1, 3)}


def _compile(args, load_after: bool) -> None:
    from rfdetr_core.aot_package import compile_package
    from rfdetr_core.ops import use_backend

    dtype = DTYPES[args.dtype]
    module, resolution = _deploy(args.variant, dtype)
    inputs = _inputs(resolution, dtype)
    with torch.no_grad(), use_backend("gather"):
        reference = {b: [t.float().cpu() for t in module(x)] for b, x in inputs.items()}
        example = inputs[3][:2] if args.dynamic else inputs[1]
        exported, compiled = compile_package(
            module, example, args.package, dynamic_batch=args.dynamic, metadata={"probe": "1"}
        )
    torch.save({"inputs": {b: x.cpu() for b, x in inputs.items()}, "reference": reference}, args.reference)
    print(f"compiled: export {exported:.1f} s, compile {compiled:.1f} s, {os.path.getsize(args.package) >> 20} MiB")
    if load_after:
        _load(args)


def _load(args) -> None:
    from rfdetr_core.aot_package import load_package

    saved = torch.load(args.reference)
    start = time.perf_counter()
    fn, metadata = load_package(args.package)
    print(f"loaded in {time.perf_counter() - start:.2f} s, metadata {metadata}", flush=True)
    batches = (1, 3) if args.dynamic else (1,)
    for b in batches:
        x = saved["inputs"][b].to(DEVICE)
        out = fn(x)
        _sync()
        start = time.perf_counter()
        for _ in range(10):
            out = fn(x)
        _sync()
        ms = (time.perf_counter() - start) * 100
        diffs = [
            float((o.float().cpu() - r).abs().max() / r.abs().max().clamp_min(1e-6))
            for o, r in zip(out, saved["reference"][b], strict=True)
        ]
        print(f"batch {b}: {ms:.2f} ms per call, max abs diff / max abs reference per output {diffs}", flush=True)
        if DEVICE == "cuda":  # what optimize() does next: the package's call captured in a CUDA graph
            print(f"batch {b}: capturing the call in a CUDA graph", flush=True)
            static, graph = x.clone(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = fn(static)
            graph.replay()
            _sync()
            worst = max(float((c.float() - o.float()).abs().max()) for c, o in zip(captured, out, strict=True))
            print(f"batch {b}: replayed, max abs difference to the direct call {worst}", flush=True)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _child(args, step: str, out: Path, case: str) -> dict:
    cmd = [sys.executable, __file__, "--step", step, "--variant", args.variant, "--dtype", args.dtype,
           "--package", str(out / f"{case}.pt2"), "--reference", str(out / f"{case}.ref.pt")]
    if case.startswith("dynamic"):
        cmd.append("--dynamic")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.perf_counter() - start
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "WARNING" not in line]
    print(f"[{case} {step}] exit {proc.returncode} after {seconds:.1f} s", flush=True)
    for line in lines[-25:]:
        print("    " + line, flush=True)
    return {"case": case, "step": step, "exit": proc.returncode, "seconds": seconds, "tail": lines[-25:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="seg-nano")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--out", default="out/aoti_probe")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per child")
    ap.add_argument("--cases", default="dynamic,static")
    ap.add_argument("--step", choices=("compile", "load", "compile+load"), help=argparse.SUPPRESS)
    ap.add_argument("--package", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    ap.add_argument("--dynamic", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        faulthandler.enable()
        if args.step == "load":
            _load(args)
        else:
            _compile(args, load_after=args.step == "compile+load")
        return
    if not torch.cuda.is_available() or os.environ.get("RFDETR_AOTI_CUDA") != "1":
        sys.exit("needs a CUDA device and RFDETR_AOTI_CUDA=1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.variant} {args.dtype}", flush=True)
    results = []
    for case in args.cases.split(","):
        results.append(_child(args, "compile", out, case))
        if results[-1]["exit"] == 0:
            results.append(_child(args, "load", out, case))
        results.append(_child(args, "compile+load", out, f"{case}-same"))
    (out / "aoti_probe.json").write_text(json.dumps({"torch": torch.__version__, "steps": results}, indent=1))


if __name__ == "__main__":
    main()
