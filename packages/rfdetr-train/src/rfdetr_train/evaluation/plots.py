"""PNG plots of one validation: confusion matrix, precision-recall and F1-confidence curves (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rfdetr_core.atomic_io import atomic_path
from rfdetr_train.evaluation.coco_matching import REC_THRS
from rfdetr_train.evaluation.confusion import ConfusionMatrix
from rfdetr_train.evaluation.per_class import CONF_GRID, class_matches, f1_confidence_curve

MAX_LABELLED = 30  # beyond this many classes, curves are drawn without a legend entry each


def _figure(size=(7, 5)):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=size, dpi=110)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# The confusion plot shows at most this many classes (those with the most ground truths and detections);
# the rest are summed into one "other classes" row and column so no count is lost.
MAX_CONFUSION_CLASSES = 30


def _class_counts(cm: ConfusionMatrix) -> np.ndarray:
    """``[K]`` detections + ground truths of each class (background excluded)."""
    k = len(cm.names)
    return cm.matrix[:k, :].sum(axis=1) + cm.matrix[:, :k].sum(axis=0)


def confusion_classes(cm: ConfusionMatrix, max_classes: int = MAX_CONFUSION_CLASSES) -> list[int]:
    """Indexes (into ``cm.names``) of the classes to draw: those present as ground truth or prediction,
    the ``max_classes`` with the largest counts when more are present, in their original order."""
    counts = _class_counts(cm)
    present = np.flatnonzero(counts > 0)
    if present.size > max_classes:
        top = present[np.argsort(-counts[present], kind="stable")[:max_classes]]
        present = np.sort(top)
    return present.tolist()


def _reduced_matrix(cm: ConfusionMatrix, keep: list[int]) -> tuple[np.ndarray, list[str]]:
    """``cm.matrix`` restricted to ``keep``, plus one "other classes" row/column summing the present classes
    left out (if any), plus background: ``[n, n]`` counts and the ``n`` labels."""
    k = len(cm.names)
    counts = _class_counts(cm)
    kept = set(keep)
    rest = [i for i in range(k) if i not in kept and counts[i] > 0]  # classes with counts left out
    groups = [[i] for i in keep]
    labels = [cm.names[i] for i in keep]
    if rest:
        groups.append(rest)
        labels.append(f"{len(rest)} other classes")
    groups.append([k])
    labels.append("background")
    rows = np.stack([cm.matrix[g, :].sum(axis=0) for g in groups])  # [n, K+1]
    mat = np.stack([rows[:, g].sum(axis=1) for g in groups], axis=1)  # [n, n]
    return mat, labels


def plot_confusion(cm: ConfusionMatrix, path: str | Path, max_classes: int = MAX_CONFUSION_CLASSES) -> Path:
    """Counts in each cell, colour = share of the true class's column (so rare classes stay readable).

    Only classes that occur (as ground truth or prediction) are drawn, at most ``max_classes`` of them; the
    others are summed into an "other classes" row and column, so every count stays in the picture.
    """
    keep = confusion_classes(cm, max_classes)
    mat, labels = _reduced_matrix(cm, keep)
    n = len(labels)
    size = min(4 + 0.35 * n, 16)
    plt, fig = _figure((size + 1.5, size))
    ax = fig.add_subplot(111)
    col = mat.sum(axis=0, keepdims=True)
    share = np.divide(mat, np.maximum(col, 1))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class (column)")
    font = 8 if n <= 15 else 6
    for i in range(n):
        for j in range(n):
            v = int(mat[i, j])
            if v:
                color = "k" if share[i, j] < 0.6 else "w"
                ax.text(j, i, str(v), ha="center", va="center", fontsize=font, color=color)
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels, rotation=90, fontsize=font)
    ax.set_yticks(ticks, labels, fontsize=font)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    shown = f"{len(keep)} of {len(cm.names)} classes" if len(keep) < len(cm.names) else "all classes"
    ax.set_title(f"confusion matrix ({shown}; IoU {cm.iou:g}, best-F1 confidence per class)", fontsize=9)
    return _save(plt, fig, Path(path))


def plot_pr_curves(report, kind: str, path: str | Path) -> Path:
    """COCO-interpolated precision against recall at IoU 0.5, per class and mean."""
    res = report.results[kind]
    prec = res.precision[0, :, :, 0, -1]  # [R, K] IoU 0.5, area all, largest maxDets
    plt, fig = _figure()
    ax = fig.add_subplot(111)
    valid = [k for k in range(prec.shape[1]) if prec[0, k] > -1]
    names = [r.name for r in report.per_class[kind]]
    for k in valid:
        lbl = f"{names[k]} {np.mean(prec[:, k]):.3f}" if len(valid) <= MAX_LABELLED else None
        ax.plot(REC_THRS, prec[:, k], lw=0.8, label=lbl)
    if valid:
        mean = prec[:, valid].mean(axis=1)
        ax.plot(REC_THRS, mean, lw=2.5, color="k", label=f"all classes {mean.mean():.3f} AP50")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"precision-recall ({kind}, IoU 0.5)")
    _legend_or_note(ax, bool(valid))
    return _save(plt, fig, Path(path))


def _legend_or_note(ax, has_curves: bool) -> None:
    """The legend, or a note when no class has ground truth (a split of negative images: no curve)."""
    if has_curves:
        ax.legend(fontsize=6, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no ground-truth objects: nothing to plot", ha="center", va="center")


def plot_f1_curves(report, kind: str, path: str | Path) -> Path:
    """F1 against the confidence threshold at IoU 0.5, per class and mean."""
    res = report.results[kind]
    plt, fig = _figure()
    ax = fig.add_subplot(111)
    names = [r.name for r in report.per_class[kind]]
    curves = []
    for k in range(len(res.cat_ids)):
        n_gt = int(res.matches.num_gt[k])
        if n_gt == 0:
            continue
        scores, tp = class_matches(res, k)
        f1 = f1_confidence_curve(scores, tp, n_gt)
        curves.append(f1)
        ax.plot(CONF_GRID, f1, lw=0.8, label=names[k] if len(names) <= MAX_LABELLED else None)
    if curves:
        mean = np.mean(curves, axis=0)
        best = int(np.argmax(mean))
        ax.plot(
            CONF_GRID, mean, lw=2.5, color="k", label=f"all classes {mean[best]:.2f} at {CONF_GRID[best]:.2f}"
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("confidence")
    ax.set_ylabel("F1")
    ax.set_title(f"F1-confidence ({kind}, IoU 0.5)")
    _legend_or_note(ax, bool(curves))
    return _save(plt, fig, Path(path))
