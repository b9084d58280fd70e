"""CPU end to end: our ONNX Runtime path against upstream rfdetr 1.11.2's ONNX export + host decode, and
against our PyTorch eager ``predict``; same weights, same process, interleaved.

For each variant (default ``seg-nano`` and ``seg-medium``) the upstream model is built with random weights and
saved as an upstream ``.pth`` (``cpu_latency.build_pair``: all 91 slots named, so both sides keep every
top-k pair). Then:

* **ours (ONNX Runtime)**: ``rfdetr-export`` of that ``.pth`` (dynamic batch, opset 17, gather sampler) run by
  :class:`rfdetr_export.runtime.OnnxRuntimeModel`; end to end = core's preprocess, the graph (top-``K``
  selection and mask gather inside it), core's host half (:func:`rfdetr_core.postprocess.finish_detections`,
  bool masks at the source size);
* **upstream (ONNX Runtime)**: ``RFDETR.export(format="onnx", dynamic_batch=True)`` of the same weights, run by
  ONNX Runtime, decoded with upstream's own helpers per image (``preprocess_to_nchw``, ``decode_detections``,
  the mask decode of its export runtime);
* **ours (PyTorch eager)**: ``RFDETR.predict``.

All three take the same 640x480 RGB image (batch 1 and 4), ``threshold=0`` (every selected pair kept, its
mask upsampled), float32, ``--threads`` threads for torch and both ONNX Runtime sessions. After ``--warmup``
calls each, ``--repeats`` rounds run the three once each in a rotating order; the reported ratios are medians
of per-round ratios. Goals (issue 14): ours <= 0.7x upstream's ONNX path, <= 0.6x our eager path.

    HF_HUB_OFFLINE=1 uv run --frozen python benchmarks/export_vs_upstream.py                 # JSON -> benchmarks/results/
    HF_HUB_OFFLINE=1 uv run --frozen python benchmarks/export_vs_upstream.py --variants seg-nano --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_latency import build_pair, source_image


def export_ours(pth: Path, variant: str, out: Path) -> Path:
    from rfdetr_export.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as log:
        code = main([str(pth), "--variant", variant, "--dynamic-batch", "--output", str(out), "--no-check"])
    if code != 0:
        raise RuntimeError(f"our export failed:\n{log.getvalue()}")
    return out


def export_upstream(up, out_dir: Path) -> Path:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        path = up.export(
            output_dir=str(out_dir), format="onnx", dynamic_batch=True, opset_version=17, verbose=False
        )
    return Path(path)


def upstream_onnx_runner(path: Path, threads: int):
    """Upstream's ONNX path per image: its preprocess, ORT, its decode (boxes, then masks by query index)."""
    import onnxruntime as ort
    from PIL import Image
    from rfdetr.export._runtime.decode import decode_detections
    from rfdetr.export._runtime.preprocess import preprocess_to_nchw
    from rfdetr.export._tflite.inference import _decode_masks

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    _, _, height, width = session.get_inputs()[0].shape
    outputs = [o.name for o in session.get_outputs()]

    def run(images: list[np.ndarray]) -> list[tuple]:
        pils = [Image.fromarray(im) for im in images]
        batch = np.concatenate([preprocess_to_nchw(p, height, width) for p in pils])
        raw = dict(zip(outputs, session.run(None, {name: batch}), strict=True))
        results = []
        for i, pil in enumerate(pils):
            dec = decode_detections(
                raw["dets"][i], raw["labels"][i], pil.size, threshold=0.0, background_class_id=None
            )
            masks = _decode_masks(raw["masks"][i][dec.query_index], pil.size)
            results.append((dec.xyxy, dec.confidence, dec.class_id, masks))
        return results

    return run


def ours_onnx_runner(path: Path, threads: int):
    from rfdetr_export.benchmark import end_to_end
    from rfdetr_export.runtime import OnnxRuntimeModel

    runner = OnnxRuntimeModel(path, threads=threads)
    return lambda images: end_to_end(runner, images, threshold=0.0)


def run_config(fns: dict, images, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn(images)
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for k in order:
            t0 = time.perf_counter()
            fns[k](images)
            times[k].append(time.perf_counter() - t0)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))  # noqa: E731
    counts = {
        k: [len(r[0]) if isinstance(r, tuple) else len(r["scores"]) for r in fns[k](images)]
        for k in ("ours_onnx", "upstream_onnx")
    }
    return {
        "ms_median": med,
        "ours_onnx_vs_upstream_onnx": ratio("ours_onnx", "upstream_onnx"),
        "ours_onnx_vs_ours_eager": ratio("ours_onnx", "ours_eager"),
        "detections_per_image": counts,
        "ms": {k: [1e3 * t for t in v] for k, v in times.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["seg-nano", "seg-medium"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--output", default=os.environ.get("OUT", "benchmarks/results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime
    import rfdetr

    import rfdetr_export

    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(),
        },
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "rfdetr": rfdetr.__version__,
            "rfdetr_export": rfdetr_export.__version__,
            "python": platform.python_version(),
        },
        "threads": args.threads,
        "repeats": args.repeats,
        "results": {},
    }
    image = source_image()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for variant in args.variants:
            up, ours = build_pair(variant, work)
            pth = work / f"{variant}_upstream.pth"
            t0 = time.perf_counter()
            ours_path = export_ours(pth, variant, work / f"{variant}_ours.onnx")
            t_ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            up_path = export_upstream(up, work / f"{variant}_upstream")
            t_up = time.perf_counter() - t0
            fns = {
                "ours_onnx": ours_onnx_runner(ours_path, args.threads),
                "upstream_onnx": upstream_onnx_runner(up_path, args.threads),
                "ours_eager": lambda images, model=ours: model.predict(
                    images, threshold=0.0, batch_size=len(images)
                ),
            }
            for batch in args.batches:
                images = [image.copy() for _ in range(batch)]
                res = run_config(fns, images, args.repeats, args.warmup)
                res["export_s"] = {"ours": t_ours, "upstream": t_up}
                report["results"][f"{variant}/batch{batch}"] = res
                print(
                    f"{variant} batch {batch}: ms {res['ms_median']}, ours/upstream-onnx "
                    f"{res['ours_onnx_vs_upstream_onnx']:.3f}, ours-onnx/ours-eager {res['ours_onnx_vs_ours_eager']:.3f}",
                    flush=True,
                )
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export_vs_upstream.json").write_text(json.dumps(report, indent=2))
    print(f"written {out / 'export_vs_upstream.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
