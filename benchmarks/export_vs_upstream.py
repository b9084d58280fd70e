"""CPU end to end: our ONNX Runtime path against upstream rfdetr 1.11.2's ONNX export + host decode, and
against our PyTorch eager ``predict``; same weights, same process, interleaved (issue 14).

For each variant (default ``seg-nano`` and ``seg-medium``) upstream's model is built with random weights
(``pretrain_weights=None``, nothing downloaded) and its state dict saved as an upstream ``.pth`` naming all 91
slots (``cpu_latency.build_pair``), so both sides keep every top-k pair and run identical weights. Three
paths, each from the same decoded ``480x640x3`` uint8 RGB array(s) (batch 1 and 4) to per-image detections
with boxes in source pixels and **bool masks ``[N, 480, 640]`` at the source size**, ``threshold=0`` (all
``num_select`` = 100 pairs kept, every mask upsampled), float32:

* **ours_onnx**: ``rfdetr-export PTH --onnx --dynamic-batch`` (opset 17; top-``K`` selection, box conversion
  and the mask gather are in the graph), run as ``RFDETR.from_file(onnx, threads=T).predict(images,
  threshold=0, batch_size=B, mask_format="bool")``: core's preprocess (uint8 -> float, antialiased bilinear
  resize, normalise), ONNX Runtime, core's host half (threshold, boxes to pixels, mask upsampling, ``> 0``),
  ``Detections``.
* **upstream_onnx**: upstream's own ``RFDETR.export(format="onnx", dynamic_batch=True, opset_version=17)``
  of the same weights (outputs ``dets``, ``labels`` for all queries x 91 slots, ``masks`` for all queries),
  session made by upstream's ``rfdetr.export._onnx.inference._create_onnx_session`` (CPU provider, its
  no-spinning options, which ours now shares; the intra-op thread count is set to ``T`` on the options it creates, as for ours),
  then upstream's own host decode per image: ``preprocess_to_nchw`` (PIL image -> torchvision resize,
  normalise), one ``session.run`` for the batch, ``decode_detections`` (sigmoid, top-k over 100x91 pairs,
  threshold, pixel xyxy) and the mask decode of its export runtime (``rfdetr.export._tflite.inference.
  _decode_masks``: gather by query, bilinear upsampling to the source size, ``> 0``; upstream's ONNX helper
  ``_run_inference`` decodes no masks and takes one image path, so its pieces are called directly).
  Not included: building ``supervision.Detections`` (ours builds its ``Detections``).
* **ours_onnx_int8**: the same as ours_onnx for ``rfdetr-export PTH --onnx --dynamic-batch --int8`` (the
  linear layers' weights int8, activations quantized at run time; ``rfdetr_export.int8``). Not the same
  arithmetic as the float32 paths: its accuracy on trained weights is in docs/benchmarks.md.
* **ours_eager**: ``RFDETR.predict`` of the converted ``.pth`` (PyTorch eager, CPU, bool masks).

Timing: ``torch.set_num_threads(T)`` and ``T`` intra-op threads for both ONNX Runtime sessions; after
``--warmup`` calls each, ``--repeats`` rounds run the three once each in a rotating order. Reported per
configuration: median and p90 ms per call of each path, and the medians of the per-round ratios
``ours / upstream_onnx`` (goal <= 0.7) and ``ours / ours_eager`` (goal <= 0.6) for ours = ours_onnx and
ours_onnx_int8. A stage profile
(``--profile-repeats``; the same batch) splits each ONNX path into preprocess, ``session.run`` and host
decode (ours: boxes/threshold, mask upsampling; plus RLE encoding for reference, which neither timed path
does). JSON goes to ``--output`` (default ``$OUT`` or ``benchmarks/results/``), rewritten after every
configuration.

Needs only the dev environment: upstream rfdetr 1.11.2 with its ``onnx`` extra's runtime pieces (``onnx``,
``onnxruntime``, ``onnxscript``) is a dev dependency, and its ONNX export without ``simplify`` needs nothing
more (checked 2026-12-03: ``onnxsim``, ``onnx_graphsurgeon`` and ``polygraphy`` are only imported for
``simplify=True`` / TensorRT, which this script does not use). Were a newer upstream to need them, install
them outside the lock, e.g. ``uv pip install --target /tmp/xbench-site onnxsim`` and run with
``PYTHONPATH=/tmp/xbench-site``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/export_vs_upstream.py                   # the record: 2 variants x bs 1, 4
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/export_vs_upstream.py --variants seg-nano --batches 1 \
        --repeats 3 --warmup 1 --profile-repeats 2                                          # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_latency import build_pair, machine, source_image

GOAL_VS_UPSTREAM = 0.7
GOAL_VS_EAGER = 0.6
OURS = ("ours_onnx", "ours_onnx_int8")  # the paths held to the goals


def export_ours(pth: Path, variant: str, out: Path, *flags: str) -> Path:
    """``rfdetr-export PTH --onnx --dynamic-batch *flags`` (default opset 17, sampler, num_select) -> ``out``."""
    from rfdetr_export.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as log:
        code = main(
            [str(pth), "--variant", variant, "--onnx", "--dynamic-batch", *flags, "--output", str(out), "--no-check"]
        )
    if code != 0:
        raise RuntimeError(f"our export failed:\n{log.getvalue()}")
    return out


def export_upstream(up, out_dir: Path) -> Path:
    """Upstream's own ONNX export of ``up`` (its defaults otherwise: no simplification)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        path = up.export(output_dir=str(out_dir), format="onnx", dynamic_batch=True, opset_version=17, verbose=False)
    return Path(path)


@contextlib.contextmanager
def _intra_op_threads(threads: int):
    """Make every ``onnxruntime.SessionOptions()`` created inside start with ``threads`` intra-op threads, so
    upstream's own session factory is used as it is, with the thread count both sides get."""
    import onnxruntime as ort

    original = ort.SessionOptions

    def options():
        opts = original()
        opts.intra_op_num_threads = threads
        return opts

    ort.SessionOptions = options
    try:
        yield
    finally:
        ort.SessionOptions = original


class UpstreamOnnx:
    """Upstream's ONNX path: its session factory, preprocessing, detection decode and mask decode."""

    def __init__(self, path: Path, threads: int):
        from rfdetr.export._onnx.inference import _create_onnx_session

        with _intra_op_threads(threads):
            self.session = _create_onnx_session(path, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.height, self.width = int(inp.shape[2]), int(inp.shape[3])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def preprocess(self, images: list[np.ndarray]):
        from PIL import Image
        from rfdetr.export._runtime.preprocess import preprocess_to_nchw

        pils = [Image.fromarray(im) for im in images]
        return pils, np.concatenate([preprocess_to_nchw(p, self.height, self.width) for p in pils])

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, {self.input_name: batch}), strict=True))

    @staticmethod
    def decode(raw: dict[str, np.ndarray], pils, masks: bool = True) -> list[tuple]:
        from rfdetr.export._runtime.decode import decode_detections
        from rfdetr.export._tflite.inference import _decode_masks

        results = []
        for i, pil in enumerate(pils):
            # sparse COCO layout (91 slots, the last one is class 90): no background slot, as upstream says
            dec = decode_detections(raw["dets"][i], raw["labels"][i], pil.size, threshold=0.0, background_class_id=None)
            m = _decode_masks(raw["masks"][i][dec.query_index], pil.size) if masks else None
            results.append((dec.xyxy, dec.confidence, dec.class_id, m))
        return results

    def __call__(self, images: list[np.ndarray]) -> list[tuple]:
        """``B`` uint8 ``[H, W, 3]`` -> per image ``(xyxy [N, 4], scores [N], slots [N], masks [N, H, W] bool)``."""
        pils, batch = self.preprocess(images)
        return self.decode(self.run(batch), pils)


def _stats(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {
        "median": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
        "min": ordered[0],
    }


def _ms(fn, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def profile_ours(model, images: list[np.ndarray], repeats: int) -> dict:
    """Median ms of each stage of ``model.predict`` (an ONNX-runner ``RFDETR``) on ``images``."""
    from rfdetr_core.mask_rle import encode_masks
    from rfdetr_core.postprocess import finish_detections, upsample_masks
    from rfdetr_core.preprocess import preprocess

    x, sizes = preprocess(images, model.resolution, model.preprocess_config)
    runner = model.runner
    scores, labels, boxes, masks = runner(x)
    kept = finish_detections(scores, labels, boxes, masks, sizes, threshold=0.0)
    bool_masks = torch.cat([r["masks"] for r in kept])
    return {
        "preprocess": _ms(lambda: preprocess(images, model.resolution, model.preprocess_config), repeats),
        "session_run": _ms(lambda: runner(x), repeats),
        "host_boxes": _ms(
            lambda: finish_detections(scores, labels, boxes, masks, sizes, threshold=0.0, mask_format="none"), repeats
        ),
        "host_masks": _ms(lambda: finish_detections(scores, labels, boxes, masks, sizes, threshold=0.0), repeats),
        "mask_upsample_only": _ms(
            lambda: [upsample_masks(m, s) for m, s in zip(masks, sizes, strict=True)], repeats
        ),
        "rle_encode_for_reference": _ms(lambda: encode_masks(bool_masks), repeats),
    }


def profile_upstream(up: UpstreamOnnx, images: list[np.ndarray], repeats: int) -> dict:
    pils, batch = up.preprocess(images)
    raw = up.run(batch)
    return {
        "preprocess": _ms(lambda: up.preprocess(images), repeats),
        "session_run": _ms(lambda: up.run(batch), repeats),
        "host_boxes": _ms(lambda: up.decode(raw, pils, masks=False), repeats),
        "host_masks": _ms(lambda: up.decode(raw, pils), repeats),
    }


def _check_same_work(out_ours, out_up, out_eager, images) -> list[int]:
    """Every path keeps the same number of detections per image, each with a bool mask at the source size."""
    h, w = images[0].shape[:2]
    counts = []
    for ours, up, eager in zip(out_ours, out_up, out_eager, strict=True):
        n = len(ours.scores)
        assert len(up[1]) == n == len(eager.scores), (n, len(up[1]), len(eager.scores))
        for m in (ours.masks, up[3], eager.masks):
            assert m.dtype == np.bool_ and m.shape == (n, h, w), (m.dtype, m.shape)
        counts.append(n)
    return counts


def run_config(paths: dict, images: list[np.ndarray], repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        for fn in paths.values():
            fn(images)
    times: dict[str, list[float]] = {k: [] for k in paths}
    names = list(paths)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for k in order:
            t0 = time.perf_counter()
            paths[k](images)
            times[k].append(1e3 * (time.perf_counter() - t0))

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    ratios = {}
    for ours in (k for k in OURS if k in paths):
        vs_up, vs_eager = ratio(ours, "upstream_onnx"), ratio(ours, "ours_eager")
        ratios[ours] = {
            "vs_upstream_onnx": vs_up,
            "vs_ours_eager": vs_eager,
            "goal_vs_upstream_met": vs_up <= GOAL_VS_UPSTREAM,
            "goal_vs_eager_met": vs_eager <= GOAL_VS_EAGER,
        }
    # the references run once; each of our paths is checked against them
    out_up, out_eager = paths["upstream_onnx"](images), paths["ours_eager"](images)
    for ours in (k for k in OURS if k in paths):
        counts = _check_same_work(paths[ours](images), out_up, out_eager, images)
    return {
        "ms": {k: _stats(v) for k, v in times.items()},
        "ratios": ratios,
        "detections_per_image": counts,
        "ms_per_round": times,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["seg-nano", "seg-medium"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-repeats", type=int, default=5, help="calls per profiled stage (0: no profile)")
    p.add_argument("--no-int8", action="store_true", help="leave out the --int8 export")
    p.add_argument("--output", default=os.environ.get("OUT", str(Path(__file__).parent / "results")))
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # upstream logs a warning per predict/export call
    torch.set_num_threads(args.threads)
    from rfdetr_core import RFDETR

    info = machine()
    info.update(
        onnxruntime=version("onnxruntime"),
        onnx=version("onnx"),
        rfdetr_export=version("rfdetr-export"),
        numpy=np.__version__,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        command=" ".join(["python", *sys.argv]),
    )
    report: dict = {"machine": info, "results": {}}
    out = Path(args.output) / "export_vs_upstream.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    image = source_image()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for variant in args.variants:
            up, eager = build_pair(variant, work)
            t0 = time.perf_counter()
            pth = work / f"{variant}_upstream.pth"
            ours_path = export_ours(pth, variant, work / f"{variant}_ours.onnx")
            t_ours = time.perf_counter() - t0
            int8_path = None
            if not args.no_int8:
                t0 = time.perf_counter()
                int8_path = export_ours(pth, variant, work / f"{variant}_ours_int8.onnx", "--int8")
                t_int8 = time.perf_counter() - t0
            t0 = time.perf_counter()
            up_path = export_upstream(up, work / f"{variant}_upstream")
            t_up = time.perf_counter() - t0
            ours = RFDETR.from_file(ours_path, threads=args.threads)
            upstream = UpstreamOnnx(up_path, args.threads)
            del up
            paths = {
                "ours_onnx": lambda ims, m=ours: m.predict(ims, threshold=0.0, batch_size=len(ims), mask_format="bool"),
                "upstream_onnx": upstream,
                "ours_eager": lambda ims, m=eager: m.predict(
                    ims, threshold=0.0, batch_size=len(ims), mask_format="bool"
                ),
            }
            ours_int8 = None
            if int8_path is not None:
                ours_int8 = RFDETR.from_file(int8_path, threads=args.threads)
                paths["ours_onnx_int8"] = lambda ims, m=ours_int8: m.predict(
                    ims, threshold=0.0, batch_size=len(ims), mask_format="bool"
                )
            for batch in args.batches:
                images = [image.copy() for _ in range(batch)]
                res = run_config(paths, images, args.repeats, args.warmup)
                res["export_s"] = {"ours": t_ours, "upstream": t_up}
                res["onnx_mb"] = {"ours": ours_path.stat().st_size / 2**20, "upstream": up_path.stat().st_size / 2**20}
                if int8_path is not None:
                    res["export_s"]["ours_int8"] = t_int8
                    res["onnx_mb"]["ours_int8"] = int8_path.stat().st_size / 2**20
                if args.profile_repeats > 0:
                    res["profile_ms"] = {
                        "ours_onnx": profile_ours(ours, images, args.profile_repeats),
                        **(
                            {"ours_onnx_int8": profile_ours(ours_int8, images, args.profile_repeats)}
                            if ours_int8 is not None
                            else {}
                        ),
                        "upstream_onnx": profile_upstream(upstream, images, args.profile_repeats),
                    }
                report["results"][f"{variant}/batch{batch}"] = res
                info["load_average_end"] = os.getloadavg()
                out.write_text(json.dumps(report, indent=2))
                med = {k: f"{v['median']:.0f}/{v['p90']:.0f}" for k, v in res["ms"].items()}
                print(f"{variant} bs{batch}: median/p90 ms {med}", flush=True)
                for name, r in res["ratios"].items():
                    print(
                        f"    {name:14s} / upstream-onnx {r['vs_upstream_onnx']:.3f} (goal {GOAL_VS_UPSTREAM})  "
                        f"/ ours-eager {r['vs_ours_eager']:.3f} (goal {GOAL_VS_EAGER})",
                        flush=True,
                    )
                if "profile_ms" in res:
                    for side, stages in res["profile_ms"].items():
                        print(f"    {side:14s} " + "  ".join(f"{k} {v:.1f}" for k, v in stages.items()), flush=True)
            del ours, ours_int8, upstream, eager
    print(f"machine: {info['cpu']}, {args.threads} threads, load {info['load_average_start']} -> {info['load_average_end']}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
