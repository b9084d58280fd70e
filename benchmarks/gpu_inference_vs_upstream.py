"""GPU inference, ours against upstream rfdetr 1.11.2, on one card with the same weights and inputs.

For each variant (seg-nano, seg-medium, seg-large) and batch size (1, 8):

* **end to end**: from decoded ``uint8 [3, 480, 640]`` images already on the GPU to detections with
  source-size masks on the host (ours: COCO RLE, decoded only on request; upstream: its dense bool masks in
  ``supervision.Detections``). Upstream's eager ``predict`` (the float [0, 1] tensor it asks for is made
  from the uint8 image inside the timed call); ours eager ``predict`` and ours after ``optimize()``.
* **model only**: a normalised input batch at the model's resolution to raw outputs on the GPU. Upstream
  eager forward and upstream's best forward-only path (``inference(compile=True,
  compile_backend="inductor", dtype=bf16)``: ``export()``, bf16 cast, ``torch.compile(mode=
  "reduce-overhead")``); ours eager forward and our fast path (bf16, CUDA graph, optionally compiled).

Detection load: random weights give ~0.01-0.07 scores, so a fixed threshold would keep nothing or
everything. ``typical`` uses the threshold that keeps ``--typical`` detections on the first image (the same
threshold for ours and upstream: same weights, same scores); ``all`` uses threshold 0 (every top-k pair).

Timing: CUDA events around each call (the end-to-end call returns host objects, so its events span the
host work too), warm-up, ``--blocks`` interleaved blocks of ``--iters`` calls per method (>= 50 calls in
all), median and p90 in ms. Cold start: ``optimize()``'s own report, and for seg-medium a second process
that optimises the same weights with the compile cache left by the first; with ``--aoti``, per variant
``optimize(compile="aoti")`` (the network compiled into an AOTInductor package) and a second process that loads
that package.

Run on the GPU machine (upstream's wheels installed, see docs/benchmarks.md):

    PYTHONPATH=packages/rfdetr-core/src python3 benchmarks/gpu_inference_vs_upstream.py --json $OUT/gpu_inference.json

``--parallel`` runs one process per variant: their compile and capture phases (CPU-bound: Dynamo tracing,
inductor code generation, both sides) overlap, then every process waits until all have compiled and they take
turns for the timed part (a lock file), so no timing runs beside another process's work. Compile and capture
seconds are then measured with the other variants compiling beside them (upper bounds of a lone start).
``--profile`` adds a ``torch.profiler`` table of our fastest end-to-end path (typical load) per batch size;
``--profile-model`` tables of the model-only paths (our fastest graph and upstream's best), with the number of
device kernels per call. ``--autotune`` adds our fast path after ``optimize(compile="max-autotune")``
(``ours_fast_autotune``: inductor's autotuned matrix multiplies; its cold start is reported like the others).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

UPSTREAM_CLASSES = {
    "seg-nano": "RFDETRSegNano",
    "seg-medium": "RFDETRSegMedium",
    "seg-large": "RFDETRSegLarge",
}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fn, n: int) -> list[float]:
    """``n`` calls of ``fn``, each timed with CUDA events (ms); wall clock on the CPU."""
    out = []
    for _ in range(n):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def interleaved(methods: dict, blocks: int, iters: int, warmup: int) -> dict:
    """Time every method in round-robin blocks; a method that raises is reported, not silently dropped."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    errors: dict[str, str] = {}
    for name, fn in methods.items():
        try:
            time_calls(fn, warmup)
        except Exception as exc:  # reported in the JSON and the table
            errors[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    for _ in range(blocks):
        for name, fn in methods.items():
            if name not in errors:
                times[name].extend(time_calls(fn, iters))
    result = {}
    for name in methods:
        if name in errors:
            result[name] = {"error": errors[name]}
            continue
        ts = sorted(times[name])
        result[name] = {
            "median_ms": statistics.median(ts),
            "p90_ms": ts[min(len(ts) - 1, int(0.9 * len(ts)))],
            "n": len(ts),
        }
    return result


def make_images(batch: int, height: int = 480, width: int = 640, device="cuda") -> list[torch.Tensor]:
    """``batch`` smooth random photos-like uint8 ``[3, H, W]`` images (low-frequency noise + edges)."""
    g = torch.Generator().manual_seed(0)
    imgs = []
    for _ in range(batch):
        low = torch.rand(1, 3, height // 16, width // 16, generator=g)
        img = torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)[
            0
        ]
        img = img + 0.1 * torch.rand(3, height, width, generator=g)
        imgs.append((img.clamp(0, 1) * 255).to(torch.uint8).to(device))
    return imgs


def upstream_checkpoint(up_model: torch.nn.Module, name: str, resolution: int, num_classes: int, path: Path):
    """The upstream module's weights in upstream's ``.pth`` layout, for our loader to convert."""
    ckpt = {
        "model": {k: v.detach().cpu().clone() for k, v in up_model.state_dict().items()},
        "model_name": name,
        "args": {"resolution": int(resolution), "num_classes": int(num_classes)},
    }
    torch.save(ckpt, path)


# Where a compile's seconds go (torch's own phase timers, summed over the graphs compiled since the last call):
# Dynamo's bytecode tracing, AOTAutograd, inductor (code generation, or loading it from the cache), kernel builds.
COMPILE_PHASES = (
    "_compile.compile_inner",
    "bytecode_tracing",
    "create_aot_dispatcher_function",
    "compile_fx_inner",
    "async_compile.wait",
    "PyCodeCache.load_by_key_path",
)


def compile_phase_seconds(reset: bool = True) -> dict[str, float]:
    """torch's compile-time metrics of the compiles since the last reset (``COMPILE_PHASES`` and the rest), in s."""
    from torch._dynamo import utils

    headers, values = utils.compile_times(repr="csv", aggregate=True)
    phases = {k: round(float(v), 3) for k, v in zip(headers, values)}
    if reset:
        utils.compilation_time_metrics.clear()
    return phases


def second_process_start(ckpt: Path, batch_sizes, compile: bool | str) -> dict:
    """Optimise the same weights in a fresh process (compile cache warm) and return its report."""
    code = (
        "import json, sys, time, warnings, torch\n"
        "warnings.filterwarnings('ignore')\n"
        "t0 = time.perf_counter()\n"
        "from rfdetr_core import RFDETR\n"
        f"m = RFDETR.from_checkpoint({str(ckpt)!r}, device='cuda')\n"
        "t1 = time.perf_counter()\n"
        f"rep = m.optimize(batch_sizes={tuple(batch_sizes)!r}, compile={compile!r})\n"
        "rep['load_seconds'] = t1 - t0\n"
        "from torch._dynamo import utils\n"
        "h, v = utils.compile_times(repr='csv', aggregate=True)\n"
        "rep['compile_phases'] = {k: round(float(x), 3) for k, x in zip(h, v)}\n"
        "print('REPORT' + json.dumps(rep))\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("REPORT"):
            rep = json.loads(line[6:])
            rep["process_wall_seconds"] = wall
            return rep
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


@contextlib.contextmanager
def timing_slot(sync_dir: Path | None, peers: int, name: str, wait_for: Path | None = None):
    """With ``sync_dir``: mark this process compiled, wait until ``peers`` processes have (and ``wait_for``
    exists), then hold an exclusive lock on ``sync_dir/lock`` for the block (one process times at a time)."""
    while wait_for is not None and not wait_for.exists():
        time.sleep(0.5)
    if sync_dir is None:
        yield
        return
    import fcntl

    (sync_dir / f"ready-{name}").touch()
    while len(list(sync_dir.glob("ready-*"))) < peers and not (sync_dir / "abort").exists():
        time.sleep(0.5)
    with open(sync_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def profile_table(fn, calls: int = 20, rows: int = 25) -> str:
    """``torch.profiler`` table (CPU and CUDA self time) of ``calls`` calls of ``fn``, after one warm call,
    headed by the device events (kernels, copies, memsets) per call and their summed time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        _sync()
    device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in device)  # a device event's own span
    avg = prof.key_averages()
    return (
        f"{calls} calls; device events per call {len(device) / calls:.1f}, device busy per call "
        f"{busy_us / calls / 1000:.3f} ms\n"
        + avg.table(sort_by="self_cpu_time_total", row_limit=rows)
        + "\n"
        + avg.table(sort_by="self_cuda_time_total", row_limit=rows)
    )


def bench_variant(variant: str, args, rows: list, report: dict) -> None:
    import rfdetr

    from rfdetr_core import RFDETR

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = dev == "cuda"
    torch.manual_seed(0)
    up = getattr(rfdetr, UPSTREAM_CLASSES[variant])(pretrain_weights=None, device=dev)
    up_module = up.model.model.eval()
    resolution = int(up.model.resolution)
    num_classes = int(up.model_config.num_classes)
    tmp = Path(tempfile.mkdtemp())
    ckpt = tmp / f"{variant}-upstream-random.pth"
    upstream_checkpoint(up_module, UPSTREAM_CLASSES[variant], resolution, num_classes, ckpt)
    ours = RFDETR.from_checkpoint(ckpt, device=dev)
    fast = RFDETR.from_checkpoint(ckpt, device=dev) if gpu else None
    fast_compiled = RFDETR.from_checkpoint(ckpt, device=dev) if args.compile_ours and gpu else None
    fast_autotune = RFDETR.from_checkpoint(ckpt, device=dev) if args.autotune and gpu else None
    info = report.setdefault(variant, {"resolution": resolution})

    start = time.perf_counter()
    if fast is not None:
        info["optimize"] = fast.optimize(batch_sizes=(1, 8), compile=False)
    if gpu:
        compile_phase_seconds()  # start the phase timers from zero
    if fast_compiled is not None:
        info["optimize_compiled"] = fast_compiled.optimize(batch_sizes=(1, 8), compile=True)
        info["optimize_compiled"]["compile_phases"] = compile_phase_seconds()
        if args.second_process and variant == "seg-medium":
            info["second_process_compiled"] = second_process_start(ckpt, (1, 8), True)
    if fast_autotune is not None:
        info["optimize_autotune"] = fast_autotune.optimize(batch_sizes=(1, 8), compile="max-autotune")
        info["optimize_autotune"]["compile_phases"] = compile_phase_seconds()
    if args.aoti and gpu:
        # the AOTInductor cold start: package compiled here (first process), loaded by a second process
        aoti = RFDETR.from_checkpoint(ckpt, device=dev)
        info["optimize_aoti"] = aoti.optimize(batch_sizes=(1, 8), compile="aoti")
        del aoti
        if args.second_process:
            info["second_process_aoti"] = second_process_start(ckpt, (1, 8), "aoti")
    print(f"{variant}: our optimize() took {time.perf_counter() - start:.1f} s", flush=True)
    for key in ("optimize_compiled", "optimize_autotune", "second_process_compiled"):
        phases = info.get(key, {}).get("compile_phases")
        if phases:
            print(f"  {key} phases (s): " + ", ".join(f"{k} {phases[k]}" for k in COMPILE_PHASES if k in phases))
            cache = info[key].get("compile_cache")
            if cache:
                print(f"  {key} compile cache: {json.dumps(cache)}", flush=True)

    # upstream's best forward-only path, one compiled module per batch size (its API compiles for one size)
    up_best: dict[int, object] = {}
    for bs in (1, 8) if gpu else ():
        t0 = time.perf_counter()
        up.inference(compile=True, batch_size=bs, dtype=torch.bfloat16, compile_backend="inductor")
        up_best[bs] = up.model.inference_model
        info[f"upstream_compile_seconds_b{bs}"] = time.perf_counter() - t0
        up.remove_optimized_model()  # its eager predict below runs the eager module again
    print(
        f"{variant}: upstream compile took {sum(info.get(f'upstream_compile_seconds_b{b}', 0) for b in (1, 8)):.1f} s"
    )

    with timing_slot(args.sync_dir, args.peers, variant, args.wait_for):
        _time_variant(
            variant, args, rows, info, ours, fast, fast_compiled, up, up_module, up_best, resolution, dev,
            fast_autotune,
        )
    up_best.clear()
    if gpu:
        torch.cuda.empty_cache()


def _time_variant(
    variant, args, rows, info, ours, fast, fast_compiled, up, up_module, up_best, resolution, dev,
    fast_autotune=None,
):
    """The timed part of :func:`bench_variant` (inside the timing slot)."""
    for bs in args.batches:
        imgs = make_images(bs, device=dev)
        x = torch.randn(bs, 3, resolution, resolution, device=dev)
        xb = x.to(torch.bfloat16)
        with torch.inference_mode():
            first = ours.predict(imgs[0], threshold=0.0, mask_format="bool")
        typical = float(np.sort(first.scores)[::-1][min(args.typical, len(first)) - 1]) - 1e-7
        loads = {"typical": typical, "all": 0.0}

        def up_predict(thr, up=up, imgs=imgs):
            def run():
                return up.predict(
                    [im.float() / 255.0 for im in imgs], threshold=thr, include_source_image=False
                )

            return run

        def our_predict(model, thr, imgs=imgs):
            def run():
                res = model.predict(list(imgs), threshold=thr, batch_size=8)
                return [r.rles for r in res]

            return run

        methods = {}
        for load, thr in loads.items():
            methods[f"e2e/{load}/upstream_predict"] = up_predict(thr)
            methods[f"e2e/{load}/ours_eager_predict"] = our_predict(ours, thr)
            if fast is not None:
                methods[f"e2e/{load}/ours_fast_predict"] = our_predict(fast, thr)
            if fast_compiled is not None:
                methods[f"e2e/{load}/ours_fast_compiled_predict"] = our_predict(fast_compiled, thr)
            if fast_autotune is not None:
                methods[f"e2e/{load}/ours_fast_autotune_predict"] = our_predict(fast_autotune, thr)

        def fwd(module, inp):
            def run():
                with torch.inference_mode():
                    return module(inp)

            return run

        # where our fast path's end-to-end time goes (typical load): the three stages on their own
        fastest = fast_compiled if fast_compiled is not None else fast
        if fastest is not None:
            methods.update(_stages(fastest, imgs, loads["typical"]))

        methods["model/upstream_eager"] = fwd(up_module, x)
        if bs in up_best:
            methods["model/upstream_best"] = fwd(up_best[bs], xb)
        methods["model/ours_eager"] = fwd(ours.model, x)
        if fast is not None:
            methods["model/ours_fast"] = fwd(fast.fast_path, x)
        if fast_compiled is not None:
            methods["model/ours_fast_compiled"] = fwd(fast_compiled.fast_path, x)
        if fast_autotune is not None:
            methods["model/ours_fast_autotune"] = fwd(fast_autotune.fast_path, x)

        counts = {}
        for load, thr in loads.items():
            with torch.inference_mode():
                counts[load] = {
                    "ours": sum(len(d) for d in ours.predict(list(imgs), threshold=thr)),
                    "upstream": sum(len(d) for d in up_predict(thr)()),
                }
        res = interleaved(methods, args.blocks, args.iters, args.warmup)
        for name, r in res.items():
            rows.append({"variant": variant, "batch": bs, "method": name, **r})
        info[f"b{bs}"] = {"thresholds": loads, "detections": counts, "results": res}
        print(json.dumps({"variant": variant, "batch": bs, "detections": counts}), flush=True)
        for name, r in res.items():
            print(
                f"  {name:<44} {r.get('median_ms', float('nan')):9.3f} ms  p90 {r.get('p90_ms', float('nan')):9.3f}"
                + (f"  ERROR {r['error']}" if "error" in r else ""),
                flush=True,
            )
        if args.profile and fastest is not None and args.json:
            table = profile_table(our_predict(fastest, loads["typical"]))
            path = args.json.with_name(f"{args.json.stem}_profile_{variant}_b{bs}.txt")
            path.write_text(table)
            print(f"  profile written to {path}", flush=True)
        if args.profile_model and args.json:
            ours_model = [m for m in ("model/ours_fast_autotune", "model/ours_fast_compiled", "model/ours_fast")
                          if m in methods]  # fmt: skip
            for name in ours_model[:1] + (["model/upstream_best"] if "model/upstream_best" in methods else []):
                table = profile_table(methods[name])
                path = args.json.with_name(f"{args.json.stem}_profile_{name.replace('/', '_')}_{variant}_b{bs}.txt")
                path.write_text(table)
                print(f"  {name}: {table.splitlines()[0]} ({path.name})", flush=True)


def _stages(model, imgs, threshold: float) -> dict:
    """Callables timing our fast path's stages alone: preprocessing, the graph replay, post-processing."""
    from rfdetr_core.postprocess import finish_detections
    from rfdetr_core.preprocess import preprocess

    x, sizes = preprocess(list(imgs), model.resolution, model.preprocess_config, device=model.device)

    def pre():
        return preprocess(list(imgs), model.resolution, model.preprocess_config, device=model.device)

    def net():
        return model.fast_path(x)  # the graph ends in the float32 selection: (scores, labels, boxes, masks)

    picked = net()

    def post():
        return finish_detections(*picked, sizes, threshold=threshold, mask_format="rle", host=True)

    return {"stage/preprocess": pre, "stage/model": net, "stage/postprocess_rle": post}


def _best(*values: float) -> float:
    """The smallest measured value (NaN = not measured)."""
    real = [v for v in values if v == v]
    return min(real) if real else float("nan")


def ratio_table(report: dict) -> list[str]:
    """Markdown rows: ours vs upstream's best forward-only path (latency ratio at B=1, throughput at B=8)."""
    lines = [
        "| variant | B | upstream best fwd ms | ours fast fwd ms | fwd ratio | ours fast e2e typical ms | "
        "e2e/upstream-best-fwd | ours fast e2e all ms | upstream predict typical ms | ours eager predict typical ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, info in report.items():
        for bs in (1, 8):
            r = info.get(f"b{bs}", {}).get("results", {})

            def med(k, r=r):
                return r.get(k, {}).get("median_ms", float("nan"))

            best = med("model/upstream_best")
            kinds = ("fast", "fast_compiled", "fast_autotune")
            ffwd = _best(*(med(f"model/ours_{k}") for k in kinds))
            e2e_t = _best(*(med(f"e2e/typical/ours_{k}_predict") for k in kinds))
            e2e_a = _best(*(med(f"e2e/all/ours_{k}_predict") for k in kinds))
            lines.append(
                f"| {variant} | {bs} | {best:.3f} | {ffwd:.3f} | {ffwd / best:.2f}x | {e2e_t:.3f} | "
                f"{e2e_t / best:.2f}x | {e2e_a:.3f} | {med('e2e/typical/upstream_predict'):.3f} | "
                f"{med('e2e/typical/ours_eager_predict'):.3f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="seg-nano,seg-medium,seg-large")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--typical", type=int, default=20, help="detections per image of the typical load")
    parser.add_argument("--no-compile-ours", dest="compile_ours", action="store_false")
    parser.add_argument("--no-second-process", dest="second_process", action="store_false")
    parser.add_argument(
        "--aoti", action="store_true", help="also the cold start of optimize(compile='aoti'), first and second process (needs RFDETR_AOTI_CUDA=1: "
        "CUDA packages are opt-in since one crashed its process on torch 2.11)"
    )
    parser.add_argument("--batches", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--parallel", action="store_true", help="one process per variant (see the docstring)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of our fastest e2e path")
    parser.add_argument(
        "--profile-model", action="store_true", help="torch.profiler tables of the model-only paths (ours, upstream)"
    )
    parser.add_argument("--autotune", action="store_true", help='also optimize(compile="max-autotune")')
    parser.add_argument("--wait-for", type=Path, default=None, help="time only once this file exists")
    parser.add_argument("--sync-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.parallel and len(args.variants.split(",")) > 1:
        run_parallel(args)
        return
    if not torch.cuda.is_available():
        print("no CUDA device: a CPU smoke run of the harness (eager paths only), not a benchmark")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    torch.backends.cuda.matmul.allow_tf32 = True  # both sides' eager fp32 run with TF32, as in the issue
    torch.backends.cudnn.allow_tf32 = True
    # each batch size compiles with static shapes, for upstream's module as for ours (otherwise the second
    # size recompiles upstream's with dynamic shapes: 73 s instead of 40 s on seg-medium, measured)
    torch._dynamo.config.automatic_dynamic_shapes = False
    report: dict = {}
    rows: list = []
    meta = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": _driver(),
        "argv": sys.argv,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(meta), flush=True)
    for variant in args.variants.split(","):
        try:
            bench_variant(variant, args, rows, report)
        except Exception as exc:  # one variant failing must not lose the others' numbers; reported
            traceback.print_exc()
            report.setdefault(variant, {})["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if args.sync_dir is not None:  # a variant that failed before its timing slot frees the barrier
                (args.sync_dir / f"ready-{variant}").touch()
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "report": report, "rows": rows}, indent=1))
    print("\n".join(ratio_table(report)))
    for variant, info in report.items():
        print(variant, {k: v for k, v in info.items() if not k.startswith("b")})


def run_parallel(args) -> None:
    """One child process per variant (``--sync-dir`` barrier and lock), then their reports merged."""
    variants = args.variants.split(",")
    sync = Path(tempfile.mkdtemp(prefix="gpu_inference_sync_"))
    out = args.json or sync / "gpu_inference.json"
    children = []
    passthrough = [a for a in sys.argv[1:] if a != "--parallel"]
    for flag in ("--variants", "--json"):  # replaced per child
        if flag in passthrough:
            i = passthrough.index(flag)
            del passthrough[i : i + 2]
    for v in variants:
        child_json = out.with_name(f"{out.stem}_{v}.json")
        cmd = [sys.executable, __file__, *passthrough, "--variants", v, "--json", str(child_json)]
        cmd += ["--sync-dir", str(sync), "--peers", str(len(variants))]
        log = open(out.with_name(f"{out.stem}_{v}.log"), "w")  # noqa: SIM115 (closed when the child ends)
        children.append((v, child_json, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    running = {v: (proc, log) for v, _, proc, log in children}
    while running:
        for v, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            if proc.returncode != 0:
                (sync / "abort").touch()  # a child that died before the barrier must not hold the others
                print(f"{v}: child exited with {proc.returncode}", flush=True)
            log.close()
            del running[v]
        time.sleep(1.0)
    meta: dict = {}
    report: dict = {}
    rows: list = []
    for v, child_json, _, _ in children:
        if child_json.exists():
            data = json.loads(child_json.read_text())
            meta = meta or data["meta"]
            report.update(data["report"])
            rows.extend(data["rows"])
        else:
            report[v] = {"error": "no JSON from the child process (see its log)"}
    meta = {**meta, "argv": sys.argv, "parallel_compile": True}
    out.write_text(json.dumps({"meta": meta, "report": report, "rows": rows}, indent=1))
    for v, *_ in children:
        log_path = out.with_name(f"{out.stem}_{v}.log")
        print(f"===== {v} ({log_path})")
        print("\n".join(line for line in log_path.read_text().splitlines() if "WARNING" not in line)[-6000:])
    print("\n".join(ratio_table(report)))
    for variant, info in report.items():
        print(variant, {k: v for k, v in info.items() if not k.startswith("b")})


def _driver() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()
    return "unknown"


if __name__ == "__main__":
    main()
