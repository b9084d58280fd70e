"""``rfdetr-train eval --gt GT.json --pred RESULTS.json [--iou-type bbox|segm|both] [--json OUT.json]``.

Prints the COCO summary and the per-class table of each evaluated type and, with ``--json``, writes the
nested metrics of DESIGN (``{"bbox": {...}, "segm": {...}, "boundary": {...}}``). Boundary AP is on unless
``--no-boundary`` (it needs masks). Results are evaluated like pycocotools on all images of the ground
truth, with pycocotools' areas: when the first result has a ``bbox``, every detection's area (its size range)
is ``w * h``, for segm too; otherwise its mask area (``rfdetr_train.evaluation.coco_sets``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rfdetr_core.errors import RFDETRError


def run_eval(args: argparse.Namespace) -> int:
    """Handler of the ``eval`` subcommand; returns the exit code."""
    from rfdetr_core.atomic_io import atomic_write_text
    from rfdetr_train.evaluation.evaluator import Evaluator
    from rfdetr_train.evaluation.results_io import load_ground_truth, load_results

    t0 = time.perf_counter()
    gt = load_ground_truth(args.gt)
    dt = load_results(args.pred, gt)
    has_masks = dt.rles is not None
    if args.iou_type == "segm" and not has_masks:
        raise RFDETRError(f"--iou-type segm needs masks, but {args.pred} has no 'segmentation' entries.")
    if args.iou_type == "both":
        types = ("bbox", "segm") if has_masks else ("bbox",)
    else:
        types = (args.iou_type,)
    if args.max_dets < 1:
        raise RFDETRError(f"--max-dets must be >= 1, got {args.max_dets}.")
    boundary = "segm" in types and not args.no_boundary
    ev = Evaluator(gt, iou_types=types, max_dets=args.max_dets, boundary=boundary)
    ev.add_detection_set(dt, sorted(gt.image_sizes))
    report = ev.compute()
    print(f"{len(dt)} detections on {len(gt.image_sizes)} images, {len(gt.categories)} categories")
    if args.iou_type == "both" and not has_masks:
        print("(no masks in the results: box metrics only)")
    if "segm" in types and dt.area_rule == "box":
        print(
            "(segm small/medium/large use the results' box areas, as pycocotools does when the first result "
            "has a 'bbox'; results without 'bbox' get mask areas, as training-time validation uses)"
        )
    print(report.summary_text())
    print()
    print(report.per_class_text())
    if args.json:
        out = Path(args.json)
        atomic_write_text(out, json.dumps(report.metrics, indent=2) + "\n")
        print(f"\nmetrics written to {out}")
    print(f"done in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return 0
