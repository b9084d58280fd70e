"""Per-class tables: AP, AP50, AP75 and precision / recall / F1 at the confidence that maximises F1.

P/R/F1 use the COCO matches at IoU 0.5 (area "all", after the per-image limit): a detection is a true
positive when it is matched to a non-crowd ground truth, detections matched to crowd regions are left out,
and the best-F1 confidence is the score threshold (``score >= conf``) giving the highest F1 over all
distinct scores of that class (the highest such confidence on ties).
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rfdetr_train.evaluation.coco_matching import IOU_THRS, CocoResult
from rfdetr_train.evaluation.coco_sets import GroundTruthSet

CONF_GRID = np.linspace(0.0, 1.0, 101)


@dataclass
class ClassRow:
    """One line of a per-class table (``nan`` where a number is undefined, e.g. AP without ground truth)."""

    category_id: int
    name: str
    images: int
    instances: int
    detections: int
    AP: float
    AP50: float
    AP75: float
    precision: float
    recall: float
    f1: float
    confidence: float


def best_f1(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> tuple[float, float, float, float]:
    """``(precision, recall, f1, confidence)`` at the threshold maximising F1.

    Args:
        scores: ``[n]`` scores of the (non-ignored) detections; tp: ``[n]`` bool true positives.
        num_gt: ground truths to find. Returns zeros and ``nan`` confidence when nothing can be found.
    """
    if num_gt == 0:  # recall undefined; precision is 0 when the class was predicted anyway
        return (0.0 if scores.size else math.nan), math.nan, math.nan, math.nan
    if scores.size == 0:
        return 0.0, 0.0, 0.0, math.nan
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], tp[order]
    tp_c = np.cumsum(t)
    n = np.arange(1, s.size + 1)
    # a threshold keeps a whole group of tied scores: evaluate at the last member of each group
    cut = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    p = tp_c[cut] / n[cut]
    r = tp_c[cut] / num_gt
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    best = int(np.flatnonzero(f1 == f1.max())[0])  # first = highest confidence among equal F1
    return float(p[best]), float(r[best]), float(f1[best]), float(s[cut[best]])


def f1_confidence_curve(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> np.ndarray:
    """F1 at each confidence of :data:`CONF_GRID` (``score >= conf`` kept): ``[101]``."""
    if num_gt == 0:
        return np.zeros_like(CONF_GRID)
    order = np.argsort(scores, kind="mergesort")
    s, t = scores[order], tp[order].astype(np.float64)
    tp_ge = np.r_[np.cumsum(t[::-1])[::-1], 0.0]  # tp_ge[i] = true positives among s[i:]
    idx = np.searchsorted(s, CONF_GRID, side="left")
    kept = s.size - idx
    tps = tp_ge[idx]
    p = np.where(kept > 0, tps / np.maximum(kept, 1), 0.0)
    r = tps / num_gt
    return np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)


def class_matches(result: CocoResult, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, tp)`` of category index ``k``'s evaluated, non-ignored detections at IoU 0.5."""
    m = result.matches
    sel = (m.cat_index == k) & ~m.ignored
    return m.score[sel], m.matched_gt[sel] >= 0


def per_class_table(result: CocoResult, gt: GroundTruthSet) -> list[ClassRow]:
    """One :class:`ClassRow` per evaluated category, in category-id order."""
    img_set = set(result.img_ids.tolist())
    in_eval = np.isin(gt.image_id, list(img_set)) & ~gt.iscrowd
    t75 = int(np.flatnonzero(IOU_THRS == 0.75)[0])

    def mean(x):
        x = x[x > -1]
        return float(np.mean(x)) if x.size else math.nan

    rows = []
    for k, cat in enumerate(result.cat_ids.tolist()):
        of_cat = in_eval & (gt.category_id == cat)
        prec = result.precision[:, :, k, 0, -1]  # [T, R] area all, largest maxDets
        scores, tp = class_matches(result, k)
        p, r, f1, conf = best_f1(scores, tp, int(result.matches.num_gt[k]))
        rows.append(
            ClassRow(
                category_id=int(cat),
                name=gt.categories.get(int(cat), str(cat)),
                images=len(set(gt.image_id[of_cat].tolist())),
                instances=int(np.count_nonzero(of_cat)),
                detections=int(np.count_nonzero(result.matches.cat_index == k)),
                AP=mean(prec),
                AP50=mean(prec[0]),
                AP75=mean(prec[t75]),
                precision=p,
                recall=r,
                f1=f1,
                confidence=conf,
            )
        )
    return rows


def overall_best_f1(result: CocoResult) -> tuple[float, float, float, float]:
    """Micro-averaged best F1 over all classes: ``(precision, recall, f1, confidence)``."""
    m = result.matches
    sel = ~m.ignored
    return best_f1(m.score[sel], m.matched_gt[sel] >= 0, int(m.num_gt.sum()))


def format_table(rows: list[ClassRow], title: str = "", skip_empty: bool = True) -> str:
    """A fixed-width terminal table (3 decimals; ``-`` for undefined); ``skip_empty`` leaves out classes
    with neither ground truth nor detections (the CSV keeps them)."""
    if skip_empty:
        hidden = sum(1 for r in rows if r.instances == 0 and r.detections == 0)
        rows = [r for r in rows if r.instances or r.detections]
    width = max([len("class"), *(len(r.name) for r in rows)]) if rows else 5
    width = min(width, 28)
    head = (
        f"{'class':<{width}} {'images':>7} {'inst':>7} {'dets':>7} {'AP':>6} {'AP50':>6} {'AP75':>6} "
        f"{'P':>6} {'R':>6} {'F1':>6} {'conf':>6}"
    )

    def f(x):
        return f"{x:6.3f}" if not math.isnan(x) else f"{'-':>6}"

    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for r in rows:
        name = r.name if len(r.name) <= width else r.name[: width - 1] + "~"
        lines.append(
            f"{name:<{width}} {r.images:>7d} {r.instances:>7d} {r.detections:>7d} {f(r.AP)} {f(r.AP50)} {f(r.AP75)} "
            f"{f(r.precision)} {f(r.recall)} {f(r.f1)} {f(r.confidence)}"
        )
    if skip_empty and hidden:
        lines.append(f"({hidden} classes without ground truth or detections not shown)")
    return "\n".join(lines)


def write_table_csv(rows: list[ClassRow], path: str | Path) -> None:
    """Write the table as CSV (atomically); undefined numbers are empty cells."""
    import io

    from rfdetr_core.atomic_io import atomic_write_text

    fields = list(ClassRow.__dataclass_fields__)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        d = asdict(r)
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()})
    atomic_write_text(Path(path), buf.getvalue())
