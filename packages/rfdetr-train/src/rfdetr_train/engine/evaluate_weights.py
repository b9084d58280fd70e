"""``rfdetr-train val``: validate a weights file or an exported model on a dataset split and write the reports.

PyTorch weights (``.safetensors``, ``.pth``, ``.pt``, ``.ckpt``) are loaded with core's ``load_model``; any
other file (``model.onnx``, ``model.engine``, ``model.pt2``) is run as it is, through the runner registered for its
suffix (``rfdetr_core.runner.runner_from_file``: rfdetr-export's ONNX Runtime, TensorRT and AOTInductor runners), with the
resolution, preprocessing and class map of the model card in its metadata. Both are scored by the same
evaluator and host half of post-processing, so an exported model's numbers can be set beside its weights'.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("rfdetr_train")


def _exported_runner(weights: str, device, max_dets: int, main_process: bool):
    """The runner of an exported file (module docstring), or ``None`` for PyTorch weights."""
    from rfdetr_core.predict import TORCH_SUFFIXES
    from rfdetr_core.runner import runner_from_file

    if Path(weights).suffix.lower() in TORCH_SUFFIXES:
        return None
    runner = runner_from_file(weights, device=device)
    card = runner.card
    pairs = card.num_queries * card.num_slots  # PyTorch weights give at most this many per image too
    k = min(card.default_num_select, pairs)
    if k < min(max_dets, pairs) and main_process:
        print(
            f"warning: {Path(weights).name} keeps {k} detections per image (its --num-select) but the metrics "
            f"count up to {max_dets} (--eval-max-dets): AR{max_dets} and AP can be lower than val of the "
            f"PyTorch weights; export with --num-select {max_dets}, or validate both with --eval-max-dets {k}."
        )
    return runner


def val(weights: str, split: str = "val", config: str | None = None, **options: Any):
    """Validate ``weights`` (PyTorch weights or an exported ``.onnx``/``.engine``, module docstring) on
    ``split`` of ``data`` (default: the synthetic dataset); returns the
    :class:`~rfdetr_train.evaluation.evaluator.EvalReport`.

    Options: ``data`` (and the other data options), ``batch_size``, ``device``, ``workers``,
    ``eval_max_dets``, ``output`` (reports folder; default ``runs/val``, ``runs/val2``, ...),
    ``allow_class_mismatch``: score the model even when its classes are not the dataset's categories
    (otherwise :class:`~rfdetr_train.evaluation.class_match.ClassMismatchError` names the mismatching ids).
    Batch size and loader workers default to those of validation during training (twice the recipe's batch;
    the training loader's workers, at most 2).
    """
    from rfdetr_core.factory import load_model
    from rfdetr_core.variants import get_variant
    from rfdetr_train.engine import recipes
    from rfdetr_train.engine.api import _setup_logging, loader_workers
    from rfdetr_train.engine.options import build_run_config
    from rfdetr_train.engine.run_dir import next_free_dir
    from rfdetr_train.engine.setup import build_validation_loader, load_data, make_accelerator
    from rfdetr_train.engine.validation import (
        evaluate,
        evaluate_runner,
        image_loader_for,
        summary_line,
        write_reports,
    )
    from rfdetr_train.evaluation.class_match import check_classes
    from rfdetr_train.evaluation.evaluator import Evaluator

    output = options.pop("output", None)
    batch_size = options.pop("batch_size", None)
    allow_mismatch = bool(options.pop("allow_class_mismatch", False))
    run = build_run_config(options, config)
    acc = make_accelerator(run.train.device, run.train.mixed_precision, 1)
    _setup_logging(acc.is_main_process)
    runner = _exported_runner(weights, acc.device, run.eval.max_dets, acc.is_main_process)
    loaded = load_model(weights=weights) if runner is None else None
    card = runner.card if runner is not None else loaded.card
    variant = get_variant(card.variant)
    data = load_data(run, variant, only_splits=(split,))
    d = run.data
    synthetic = d.path is None and not (d.train_ann or d.val_ann or d.test_ann)
    label = str(d.path or d.val_ann or d.test_ann or d.train_ann)
    if synthetic:
        label = f"the built-in synthetic dataset ({', '.join(data.class_map.names)}; no --data given)"
        if acc.is_main_process:
            print(f"No --data given: validating on the built-in synthetic dataset at {data.source.root}.")
    mismatch = check_classes(card.class_map, data.class_map, str(weights), label, allow_mismatch)
    if mismatch and acc.is_main_process:
        print(f"warning: --allow-class-mismatch: scoring anyway although {mismatch.describe()}.")
    # the defaults of validation during training: the recipe's batch x 2, the training loader's workers (max 2)
    loader = build_validation_loader(
        data, split, recipes.resolve(run.train, variant), card.resolution, card.preprocess, acc,
        loader_workers(acc, run.data.workers), batch_size=batch_size,
    )  # fmt: skip
    evaluator = Evaluator.from_config(
        data.coco_gt(split), run.eval, class_map=card.class_map, accelerator=acc, training=False
    )
    if runner is None:
        report = evaluate(loaded.model.to(acc.device), loader, evaluator, acc)
    else:
        report = evaluate_runner(runner, loader, evaluator, acc)
    if acc.is_main_process:
        out = Path(output) if output else next_free_dir(Path(run.train.output), "val")
        out.mkdir(parents=True, exist_ok=True)
        run_by = f", run by {runner.backend}" if runner is not None else ""
        print(
            f"{Path(weights).name} on {split} ({len(loader.image_ids)} images{run_by}): "
            f"{summary_line(report.metrics)}"
        )
        print(report.summary_text())
        print(report.per_class_text())
        write_reports(out, report, {"weights": str(weights), "split": split}, run.eval, "segm/AP", True,
                      load_image=image_loader_for(data, split))  # fmt: skip
        print(f"reports written to {out}")
    return report
