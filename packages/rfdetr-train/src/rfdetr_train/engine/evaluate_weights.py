"""``rfdetr-train val``: validate a weights file on a dataset split and write the reports."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("rfdetr_train")


def val(weights: str, split: str = "val", config: str | None = None, **options: Any):
    """Validate ``weights`` on ``split`` of ``data`` (default: the synthetic dataset); returns the
    :class:`~rfdetr_train.evaluation.evaluator.EvalReport`.

    Options: ``data`` (and the other data options), ``batch_size``, ``device``, ``workers``,
    ``eval_max_dets``, ``output`` (reports folder; default ``runs/val``, ``runs/val2``, ...),
    ``allow_class_mismatch``: score the model even when its classes are not the dataset's categories
    (otherwise :class:`~rfdetr_train.evaluation.class_match.ClassMismatchError` names the mismatching ids).
    Batch size and loader workers default to those of validation during training (twice the recipe's batch;
    the training loader's workers, at most 2).
    """
    from rfdetr_core.factory import load_model
    from rfdetr_train.engine import recipes
    from rfdetr_train.engine.api import _setup_logging, loader_workers
    from rfdetr_train.engine.options import build_run_config
    from rfdetr_train.engine.run_dir import next_free_dir
    from rfdetr_train.engine.setup import build_validation_loader, load_data, make_accelerator
    from rfdetr_train.engine.validation import evaluate, image_loader_for, summary_line, write_reports
    from rfdetr_train.evaluation.class_match import check_classes
    from rfdetr_train.evaluation.evaluator import Evaluator

    output = options.pop("output", None)
    batch_size = options.pop("batch_size", None)
    allow_mismatch = bool(options.pop("allow_class_mismatch", False))
    run = build_run_config(options, config)
    acc = make_accelerator(run.train.device, run.train.mixed_precision, 1)
    _setup_logging(acc.is_main_process)
    loaded = load_model(weights=weights)
    data = load_data(run, loaded.variant, only_splits=(split,))
    d = run.data
    synthetic = d.path is None and not (d.train_ann or d.val_ann or d.test_ann)
    label = str(d.path or d.val_ann or d.test_ann or d.train_ann)
    if synthetic:
        label = f"the built-in synthetic dataset ({', '.join(data.class_map.names)}; no --data given)"
        if acc.is_main_process:
            print(f"No --data given: validating on the built-in synthetic dataset at {data.source.root}.")
    mismatch = check_classes(loaded.class_map, data.class_map, str(weights), label, allow_mismatch)
    if mismatch and acc.is_main_process:
        print(f"warning: --allow-class-mismatch: scoring anyway although {mismatch.describe()}.")
    # the defaults of validation during training: the recipe's batch x 2, the training loader's workers (max 2)
    loader = build_validation_loader(
        data, split, recipes.resolve(run.train, loaded.variant), loaded.resolution, loaded.preprocess, acc,
        loader_workers(acc, run.data.workers), batch_size=batch_size,
    )  # fmt: skip
    evaluator = Evaluator.from_config(
        data.coco_gt(split), run.eval, class_map=loaded.class_map, accelerator=acc, training=False
    )
    model = loaded.model.to(acc.device)
    report = evaluate(model, loader, evaluator, acc)
    if acc.is_main_process:
        out = Path(output) if output else next_free_dir(Path(run.train.output), "val")
        out.mkdir(parents=True, exist_ok=True)
        print(
            f"{Path(weights).name} on {split} ({len(loader.image_ids)} images): {summary_line(report.metrics)}"
        )
        print(report.summary_text())
        print(report.per_class_text())
        write_reports(out, report, {"weights": str(weights), "split": split}, run.eval, "segm/AP", True,
                      load_image=image_loader_for(data, split))  # fmt: skip
        print(f"reports written to {out}")
    return report
