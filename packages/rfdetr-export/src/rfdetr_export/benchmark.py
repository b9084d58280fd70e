"""``rfdetr-export benchmark``: latency and throughput of one backend, end to end and model only.

* **end to end**: decoded RGB images (``uint8 H x W x 3``, built-in synthetic ones at ``--image-size``) in,
  per-image detections on the host with boxes in source pixels and masks at the source size out (bool arrays
  on the CPU; COCO RLE on CUDA, as ``RFDETR.predict`` returns them there): the one preprocessing path, the
  backend, and core's host half (:func:`rfdetr_core.postprocess.finish_detections`, score threshold
  ``--threshold``);
* **model only**: the backend on an already normalised batch on the device (the deploy tuple out).

Backends: ``torch`` (core's ``DeployModel``, eager), ``compile`` (on the CPU the same through
``torch.compile``; on CUDA core's GPU fast path, ``RFDETR.optimize``: the network in ``--dtype`` through
``torch.compile``, the float32 selection, one CUDA graph for ``--batch-size``), ``onnxruntime`` (an ``.onnx``
file), ``tensorrt`` (an ``.engine``) and ``aoti`` (a ``.pt2``). ``--compile-mode max-autotune`` lets inductor
time its own matrix-multiply kernels against cuBLAS (slower to start). Each timing is ``--iters`` calls after
``--warmup`` calls, synchronising CUDA after each; the table gives median and p90 per call and images/s at the
median (with the CUDA fast path also the seconds it took to get ready: load, compile, capture), and ``--json``
writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rfdetr_core.errors import RFDETRError, first_line

BACKENDS = ("torch", "compile", "onnxruntime", "tensorrt", "aoti")
COMPILE_MODES = ("default", "max-autotune")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rfdetr-export benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL", help="checkpoint/official name (torch, compile), .onnx, .engine, .pt2 (aoti)")
    p.add_argument("--backend", choices=BACKENDS, required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch and ONNX Runtime)")
    p.add_argument(
        "--image-size", default="480x640", help="HxW of the synthetic source images (default 480x640)"
    )
    p.add_argument("--threshold", type=float, default=0.5, help="score threshold of the end-to-end path")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="compile backend: inductor's default or max-autotune (autotuned matrix multiplies, slower start)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="bfloat16",
        help="compile backend on CUDA: the fast path's network dtype (default bfloat16; the selection is float32)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--variant", help="variant of an upstream file that does not say")
    p.add_argument("--debug", action="store_true")
    return p


class TorchRunner:
    """Core's ``DeployModel`` (optionally ``torch.compile``d) behind the runner interface."""

    def __init__(
        self,
        model: str,
        device: torch.device,
        compile_it: bool,
        variant: str | None = None,
        compile_mode: str = "default",
    ):
        from rfdetr_core.deploy import DeployModel
        from rfdetr_core.factory import load_model

        loaded = load_model(variant, None, model)
        self.card = loaded.card
        self.device = device
        self.backend = "compile" if compile_it else "torch"
        self.module = DeployModel(loaded.model.to(device), self.card).eval()
        mode = None if compile_mode == "default" else compile_mode
        self._call = torch.compile(self.module, mode=mode) if compile_it else self.module

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return self._call(images.to(self.device))


class FastPathRunner:
    """Core's GPU fast path (``RFDETR.optimize``) behind the runner interface: the ``compile`` backend on CUDA.

    A call takes a normalised ``[B, 3, H, W]`` batch and returns the captured graph's float32 selection
    ``(scores, labels, boxes, masks)`` (``DeployModel``'s tuple); ``report`` is ``optimize``'s cold-start report.
    """

    def __init__(
        self,
        model: str,
        device: torch.device,
        batch_size: int,
        dtype: torch.dtype,
        variant: str | None = None,
        compile_mode: str = "default",
    ):
        from rfdetr_core import RFDETR

        self.rfdetr = RFDETR.from_checkpoint(model, variant=variant, device=device)
        self.card = self.rfdetr.card
        self.device = self.rfdetr.device
        self.backend = "compile"
        self.report = self.rfdetr.optimize(
            batch_sizes=(batch_size,),
            dtype=dtype,
            compile=True if compile_mode == "default" else compile_mode,
        )

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.rfdetr.fast_path(images.to(self.device))


def make_runner(
    backend: str,
    model: str,
    device: str,
    threads: int | None,
    variant: str | None = None,
    *,
    batch_size: int = 1,
    compile_mode: str = "default",
    dtype: str = "bfloat16",
):
    """The runner for ``backend`` (``.card``, ``.device``, call on a normalised batch); ``batch_size``,
    ``compile_mode`` and ``dtype`` shape the ``compile`` backend (its CUDA fast path captures ``batch_size``)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RFDETRError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    if threads is not None:
        torch.set_num_threads(int(threads))
    if backend == "compile" and dev.type == "cuda":
        return FastPathRunner(model, dev, batch_size, DTYPES[dtype], variant, compile_mode)
    if backend in ("torch", "compile"):
        return TorchRunner(model, dev, backend == "compile", variant, compile_mode)
    if not Path(model).is_file():
        raise RFDETRError(f"{model}: no such file (the {backend} backend takes an exported file).")
    if backend == "onnxruntime":
        from rfdetr_export.runtime import OnnxRuntimeModel

        return OnnxRuntimeModel(model, device=dev, threads=threads)
    if backend == "aoti":
        from rfdetr_export.aoti import AotiModel

        return AotiModel(model, device=dev)
    from rfdetr_export.runtime import TensorRTModel

    return TensorRTModel(model, device=dev if dev.type == "cuda" else None)


def _timed(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> list[float]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _summary(times: Sequence[float], batch: int) -> dict:
    ordered = sorted(times)
    median = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {
        "median_ms": median * 1e3,
        "p90_ms": p90 * 1e3,
        "images_per_s": batch / median,
        "iters": len(times),
    }


def end_to_end(runner, images: list, threshold: float) -> list[dict]:
    """Decoded images -> per-image detections on the host at the source size (bool masks on the CPU, RLE on
    CUDA): the path ``predict`` takes."""
    from rfdetr_core.postprocess import default_mask_format, finish_detections
    from rfdetr_core.preprocess import preprocess

    x, sizes = preprocess(images, runner.card.resolution, runner.card.preprocess, device=runner.device)
    outputs = runner(x)
    masks = outputs[3] if len(outputs) > 3 else None
    return finish_detections(
        *outputs[:3], masks, sizes, threshold=threshold, mask_format=default_mask_format(runner.device), host=True
    )


def benchmark(
    runner, batch_size: int, image_size: tuple[int, int], threshold: float, warmup: int, iters: int
) -> dict:
    """Time ``runner`` end to end and model only; returns the result dict (milliseconds, images/s)."""
    from rfdetr_core.preprocess import preprocess
    from rfdetr_export.check import synthetic_images

    images = synthetic_images(batch_size, image_size)
    x, _ = preprocess(images, runner.card.resolution, runner.card.preprocess, device=runner.device)
    with torch.inference_mode():
        e2e = _timed(lambda: end_to_end(runner, images, threshold), warmup, iters, runner.device)
        model_only = _timed(lambda: runner(x), warmup, iters, runner.device)
    return {
        "backend": getattr(runner, "backend", "?"),
        "fast_path": _fast_path_facts(runner),
        "variant": runner.card.variant,
        "resolution": list(runner.card.resolution),
        "batch_size": batch_size,
        "device": str(runner.device),
        "threads": torch.get_num_threads(),
        "image_size": list(image_size),
        "end_to_end": _summary(e2e, batch_size),
        "model_only": _summary(model_only, batch_size),
    }


def _fast_path_facts(runner) -> dict | None:
    """What the CUDA fast path ran (dtype, compile mode, captured batch sizes) and its setup seconds; None for
    other runners."""
    report = getattr(runner, "report", None)
    if report is None:
        return None
    return {
        "dtype": report["dtype"],
        "compiled": report["compiled"],
        "batch_sizes": sorted(int(b) for b in report["capture_seconds"]),
        "setup_seconds": report["seconds"],
        "compile_cache": report["compile_cache"],
    }


def table(result: dict) -> str:
    rows = [f"{'':<12} {'median ms':>10} {'p90 ms':>10} {'images/s':>10}"]
    for key, label in (("end_to_end", "end to end"), ("model_only", "model only")):
        r = result[key]
        rows.append(f"{label:<12} {r['median_ms']:>10.2f} {r['p90_ms']:>10.2f} {r['images_per_s']:>10.2f}")
    head = (
        f"{result['backend']} {result['variant']} @{result['resolution'][0]}x{result['resolution'][1]}, batch "
        f"{result['batch_size']}, {result['device']}, {result['threads']} threads, source "
        f"{result['image_size'][0]}x{result['image_size'][1]}"
    )
    fast = result.get("fast_path")
    if fast:
        head += (
            f"\nCUDA fast path: {fast['dtype']}, compile {fast['compiled']}, graphs for batch "
            f"{', '.join(map(str, fast['batch_sizes']))}, ready in {fast['setup_seconds']:.1f} s"
        )
    return "\n".join([head, *rows])


def _image_size(text: str) -> tuple[int, int]:
    """``"480x640"`` -> ``(480, 640)``."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise RFDETRError(f"--image-size {text!r}: give HxW in pixels, e.g. 480x640") from None
    if height < 1 or width < 1:
        raise RFDETRError(f"--image-size {text!r}: both sides must be >= 1 pixel")
    return height, width


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()  # --threads sets torch's; given back after the run (library callers)
    try:
        size = _image_size(args.image_size)
        if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
            raise RFDETRError("--batch-size and --iters must be >= 1, --warmup >= 0")
        runner = make_runner(
            args.backend,
            args.model,
            args.device,
            args.threads,
            args.variant,
            batch_size=args.batch_size,
            compile_mode=args.compile_mode,
            dtype=args.dtype,
        )
        result = benchmark(runner, args.batch_size, size, args.threshold, args.warmup, args.iters)
    except (RFDETRError, OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"rfdetr-export benchmark: error: {first_line(exc) or type(exc).__name__}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0
