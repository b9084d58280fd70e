"""Report files in the run directory (names per DESIGN), written atomically.

=========================  ====================================================================
``results.csv``            one row per validation: caller's fields (step, epoch, ...) + ``bbox/AP`` ...
``metrics.json``           ``{"last": {...}, "best": {...}}`` with the nested metrics of DESIGN
``per_class_bbox.csv``     per-class table (also ``per_class_segm.csv``)
``confusion_matrix_bbox``  ``.csv`` and ``.png`` (also ``_segm``), background row and column
``pr_curve_bbox.png``      precision-recall at IoU 0.5 per class and mean (also ``_segm``)
``f1_curve_bbox.png``      F1 against confidence per class and mean (also ``_segm``)
``val_gallery.jpg``        ground truth beside predictions for a few validation images
=========================  ====================================================================
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rfdetr_core.atomic_io import atomic_write_text
from rfdetr_train.evaluation.evaluator import EvalReport
from rfdetr_train.evaluation.per_class import write_table_csv

RESULTS_CSV = "results.csv"
METRICS_JSON = "metrics.json"


def flatten_metrics(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{"bbox": {"AP": x}}`` -> ``{"bbox/AP": x}``."""
    return {f"{kind}/{k}": v for kind, sec in metrics.items() for k, v in sec.items()}


def append_results_row(run_dir: str | Path, row: Mapping[str, Any]) -> Path:
    """Append one row to ``results.csv``; a new column rewrites the header (earlier rows get blanks)."""
    path = Path(run_dir) / RESULTS_CSV
    rows, fields = [], []
    if path.exists():
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
    for k in row:
        if k not in fields:
            fields.append(k)
    rows.append({k: _cell(v) for k, v in row.items()})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return path


def _cell(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def default_best_key(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """Mask AP when masks were evaluated, box AP otherwise."""
    return "segm/AP" if "segm" in metrics else "bbox/AP"


def update_metrics_json(
    run_dir: str | Path,
    metrics: Mapping[str, Mapping[str, float]],
    extra: Mapping[str, Any] | None = None,
    best_key: str | None = None,
) -> bool:
    """Write ``metrics.json`` = ``{"last": ..., "best": ...}``; return True when this validation is the best.

    ``best_key`` (``"segm/AP"`` style) picks the best; higher is better. ``extra`` (step, epoch) is stored
    beside the nested metrics.
    """
    path = Path(run_dir) / METRICS_JSON
    best_key = best_key or default_best_key(metrics)
    entry = {**(dict(extra) if extra else {}), **{k: dict(v) for k, v in metrics.items()}}
    old = json.loads(path.read_text()) if path.exists() else {}
    kind, _, name = best_key.partition("/")
    new_val = metrics.get(kind, {}).get(name, float("nan"))
    prev = old.get("best")
    prev_val = prev.get(kind, {}).get(name, float("-inf")) if prev else float("-inf")
    is_best = prev is None or (not math.isnan(new_val) and new_val > prev_val)
    out = {"last": entry, "best": entry if is_best else prev, "best_key": best_key}
    atomic_write_text(path, json.dumps(out, indent=2) + "\n")
    return is_best


def write_validation_reports(
    run_dir: str | Path,
    report: EvalReport,
    extra: Mapping[str, Any] | None = None,
    *,
    best_key: str | None = None,
    plots: bool = True,
    load_image: Callable[[int], Any] | None = None,
    gallery_images: int = 8,
) -> dict[str, Any]:
    """Write every report of one validation into ``run_dir``; returns ``{"files": [...], "is_best": bool}``.

    Args:
        extra: fields placed first in the ``results.csv`` row and in ``metrics.json`` (e.g. step, epoch).
        load_image: image id -> image (path, array or PIL) for the gallery; no gallery without it.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    files = []
    row = {**(dict(extra) if extra else {}), **flatten_metrics(report.metrics)}
    files.append(append_results_row(run, row))
    is_best = update_metrics_json(run, report.metrics, extra, best_key)
    files.append(run / METRICS_JSON)
    for kind, rows in report.per_class.items():
        p = run / f"per_class_{kind}.csv"
        write_table_csv(rows, p)
        files.append(p)
        cm = report.confusion[kind]
        p = run / f"confusion_matrix_{kind}.csv"
        cm.write_csv(p)
        files.append(p)
    if plots:
        from rfdetr_train.evaluation.plots import plot_confusion, plot_f1_curves, plot_pr_curves

        for kind in report.per_class:
            files.append(plot_confusion(report.confusion[kind], run / f"confusion_matrix_{kind}.png"))
            files.append(plot_pr_curves(report, kind, run / f"pr_curve_{kind}.png"))
            files.append(plot_f1_curves(report, kind, run / f"f1_curve_{kind}.png"))
    if load_image is not None and gallery_images > 0:
        from rfdetr_train.evaluation.gallery import write_gallery

        files.append(write_gallery(run / "val_gallery.jpg", report, load_image, gallery_images))
    return {"files": [Path(f) for f in files], "is_best": is_best}
