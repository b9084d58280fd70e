"""COCO box/mask evaluation, per-class tables and reports of rfdetr-train.

For the training engine::

    from rfdetr_train.evaluation import Evaluator, write_validation_reports

    ev = Evaluator.from_config(coco_gt, run_config.eval, class_map, accelerator=acc, training=True)
    ev.reset()
    for images, targets in val_loader:            # targets: image_id (dataset id), orig_size (h, w)
        ev.update(model(images), targets)          # pred_logits [B,Q,K], pred_boxes [B,Q,4], pred_masks [B,Q,h,w]
    report = ev.compute()                          # EvalReport (gathered over processes, same on every rank)
    print(report.summary_text()); print(report.per_class_text())
    info = write_validation_reports(run_dir, report, {"step": step, "epoch": epoch}, load_image=...)
    info["is_best"]                                 # by segm/AP (bbox/AP without masks) unless best_key=...

``report.metrics`` is the nested schema of DESIGN: ``{"bbox": {AP, AP50, AP75, APs, APm, APl, AR1, AR10,
AR100, ARs, ARm, ARl}, "segm": {...}, "boundary": {...}}`` (``AR{N}`` for ``max_dets = N``).

Modules: :mod:`.evaluator` (Evaluator, EvalReport), :mod:`.coco_matching` (the fast COCOeval), :mod:`.coco_reference` (pycocotools backend), :mod:`.boundary`
(Boundary IoU masks), :mod:`.per_class`, :mod:`.confusion`, :mod:`.reports` (files), :mod:`.plots`,
:mod:`.gallery`, :mod:`.results_io` and :mod:`.eval_command` (``rfdetr-train eval``).
"""

from rfdetr_train.evaluation.config import EvalConfig
from rfdetr_train.evaluation.evaluator import EvalReport, Evaluator
from rfdetr_train.evaluation.reports import (
    append_results_row,
    update_metrics_json,
    write_validation_reports,
)

__all__ = [
    "EvalConfig",
    "EvalReport",
    "Evaluator",
    "append_results_row",
    "update_metrics_json",
    "write_validation_reports",
]
