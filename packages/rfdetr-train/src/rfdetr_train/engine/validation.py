"""Validation during training and ``rfdetr-train val``: forward the validation shard of every process, let
the evaluator gather the detections, print the per-class table and write the reports on the main process."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("rfdetr_train")


@torch.no_grad()
def evaluate(model: nn.Module, loader, evaluator, accelerator) -> Any:
    """An :class:`~rfdetr_train.evaluation.evaluator.EvalReport` of ``model`` on ``loader`` (all processes).

    ``model`` is an unwrapped module (the EMA copy or the raw model); it is put in eval mode and given back in
    the mode it had. The global RNG is left untouched (the data loader draws a seed from it), so validating
    never changes the training trajectory.
    """
    was_training = model.training
    model.eval()
    evaluator.reset()
    device = accelerator.device
    try:
        with torch.random.fork_rng(devices=[]), accelerator.autocast():
            for batch in loader:
                batch = batch.to(device, non_blocking=True)
                outputs = model(batch.images)
                evaluator.update(outputs, batch.targets)
        return evaluator.compute()
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_runner(runner, loader, evaluator, accelerator) -> Any:
    """An :class:`~rfdetr_train.evaluation.evaluator.EvalReport` of an exported model on ``loader``.

    ``runner`` is a runner of :mod:`rfdetr_core.runner` (e.g. rfdetr-export's ONNX Runtime or TensorRT one):
    ``images [B, 3, H, W]`` normalised -> ``(scores [B, K], labels [B, K], boxes [B, K, 4][, masks [B, K, h,
    w]])``, already selected in its graph; the evaluator scores the first ``max_dets`` of each image through
    the same host half of post-processing as :func:`evaluate`.
    """
    evaluator.reset()
    device = accelerator.device
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            batch = batch.to(device, non_blocking=True)
            out = runner(batch.images)
            masks = out[3] if len(out) > 3 else None
            evaluator.update_selected(out[0], out[1], out[2], masks, batch.targets)
    return evaluator.compute()


def metric_value(metrics: dict, key: str) -> float:
    """``"segm/AP50"`` -> ``metrics["segm"]["AP50"]`` (NaN when absent)."""
    kind, _, name = key.partition("/")
    return float(metrics.get(kind, {}).get(name, float("nan")))


def summary_line(metrics: dict) -> str:
    parts = []
    for kind in ("segm", "bbox", "boundary"):
        if kind in metrics:
            m = metrics[kind]
            parts.append(f"{kind} AP {m.get('AP', float('nan')):.3f} AP50 {m.get('AP50', float('nan')):.3f}")
    return " | ".join(parts)


def image_loader_for(data, split: str):
    """Image id -> file path of ``split`` (for the validation gallery)."""
    from rfdetr_train.data.load import image_root_of

    root = Path(image_root_of(data, split))
    files = {im["id"]: im["file_name"] for im in data.split(split).coco["images"]}

    def load(image_id: int):
        return root / files[int(image_id)]

    return load


def write_reports(run_dir: Path, report, extra: dict, eval_cfg, best_key: str, final: bool, load_image=None):
    """results.csv / metrics.json / per-class tables every time; plots and the gallery at the final one."""
    from rfdetr_train.evaluation.reports import write_validation_reports

    return write_validation_reports(
        run_dir,
        report,
        extra,
        best_key=best_key,
        plots=eval_cfg.plots and final,
        load_image=load_image if final else None,
        gallery_images=eval_cfg.gallery_images,
    )
