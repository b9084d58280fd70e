"""``rfdetr_train.train(...)`` and ``rfdetr_train.val(...)``: the Python API the CLI also goes through."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from rfdetr_core.atomic_io import atomic_write_text
from rfdetr_train.engine import recipes
from rfdetr_train.engine.options import build_run_config, dump_yaml
from rfdetr_train.engine.run_dir import check_new_run_dir, new_run_dir

log = logging.getLogger("rfdetr_train")


class _StdoutHandler(logging.Handler):
    """Plain lines on whatever ``sys.stdout`` is at the time (notebooks and test captures swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stdout, flush=True)


def _setup_logging(main: bool) -> None:
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        log.addHandler(_StdoutHandler())
        log.propagate = False
    log.setLevel(logging.INFO if main else logging.WARNING)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loader_workers(accelerator, requested: int | None) -> int:
    """Data-loader workers: ``requested`` if given; else 0 for CPU training on 2 cores or fewer per process
    (a worker would take a whole core from the intra-op threads; measured on the CPU demo: 2 compute threads
    loading in the main process run ~1.4x faster than 1 thread + 1 worker), else ``default_workers()``."""
    from rfdetr_train.data import default_workers

    if requested is not None:
        return requested
    if accelerator.device.type == "cpu" and _cores() // accelerator.num_processes <= 2:
        return 0
    return default_workers()


def cpu_threads(accelerator, workers: int) -> int | None:
    """On CPU, leave one core per loader worker: intra-op threads that share cores with the loader (or with
    other processes) spin at OpenMP barriers and run several times slower. ``OMP_NUM_THREADS`` wins."""
    import torch

    if accelerator.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = max(1, _cores() // accelerator.num_processes - workers)
    torch.set_num_threads(threads)
    return threads


def _broadcast(accelerator, value):
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def train(config: str | os.PathLike | None = None, **options: Any):
    """Train a model; returns a :class:`~rfdetr_train.engine.trainer.TrainResult`.

    Options are those of ``python -m rfdetr_train`` in snake_case (``data``, ``model``, ``weights``,
    ``epochs`` or ``steps``, ``batch_size``, ``grad_accum``, ``lr``, ``resolution``, ``ema_decay``,
    ``num_queries``, ``eval_max_dets``, ``seed``, ``device``, ``workers``, ``steps_per_validation``,
    ``test_limit``, ``output``, ``name``, ``resume``, ``skip_invalid``, ...), plus every field of
    :class:`~rfdetr_train.config.RunConfig`; ``config`` is a YAML file of the same options. Without any
    option it trains ``seg-tiny`` on the built-in synthetic dataset (the CPU demo); with a dataset and
    neither ``model`` nor ``weights`` it fine-tunes ``seg-nano`` from its official COCO weights
    (:mod:`~rfdetr_train.engine.starting_point`; ``weights="none"``: random weights).

    Nothing is written before the data, weights, resolution and trackers have been checked: a run that
    cannot start leaves no run directory behind.
    """
    import torch

    from rfdetr_train.engine.resume import resume_line, resume_position, resumed_run
    from rfdetr_train.engine.setup import (
        Parts,
        build_criterion_for,
        build_loaders,
        load_data,
        make_accelerator,
        read_initial_weights,
        resolve_variant,
    )
    from rfdetr_train.engine.starting_point import choose_starting_point, has_dataset
    from rfdetr_train.engine.trackers import check_trackers
    from rfdetr_train.engine.trainer import Trainer

    run = build_run_config(options, config)
    resume_state = None
    start = None
    if run.train.resume is not None:
        run, run_dir, resume_state = resumed_run(run, options)
    else:
        start = choose_starting_point(run.train.model, run.train.weights, has_dataset(run.data))
        run = run.model_copy(
            update={"train": run.train.model_copy(update={"model": start.model, "weights": start.weights})}
        )
    weights_file = read_initial_weights(run.train.weights)  # the one read of a --weights file
    variant = resolve_variant(run.train.model, run.train.weights, run.train.num_queries, weights_file)
    quick_look = (
        resume_state is None
        and run.train.test_limit is not None
        and not (run.train.steps or run.train.epochs)
    )
    train_cfg = recipes.resolve(run.train, variant)
    run = run.model_copy(
        update={"train": train_cfg, "data": recipes.resolve_data(run.data, train_cfg.recipe)}
    )
    cfg = run.train
    acc = make_accelerator(cfg.device, cfg.mixed_precision, cfg.grad_accum)
    _setup_logging(acc.is_main_process)
    if acc.is_main_process:
        if resume_state is not None:
            log.info("%s", resume_line(run_dir, resume_state))
        elif start.note:
            log.info("%s", start.note)
    if quick_look and acc.is_main_process:
        length = f"step {cfg.steps}" if cfg.steps else "the end of epoch 1"
        log.info(
            "quick look (--test-limit without --steps or --epochs): training stops after the first "
            "validation, at %s; give --steps or --epochs for a longer run.", length,
        )  # fmt: skip
    # Everything that can fail on the user's input (wandb, data, weights, resolution) comes before the run
    # directory is made: a failed start leaves no runs/<name>/ behind and takes no name.
    check_trackers(cfg.wandb)
    if resume_state is None:
        check_new_run_dir(cfg.output, cfg.name)  # a taken --name, before the data is read
    torch.manual_seed(cfg.seed)  # same initial weights in every process (DDP also broadcasts them)
    data = load_data(run, variant)
    if acc.is_main_process and run.data.skip_invalid:
        summary = data.dropped_summary()
        if summary:
            log.info("%s", summary)
    workers = loader_workers(acc, run.data.workers)
    threads = cpu_threads(acc, workers)
    if threads is not None and acc.is_main_process:
        log.info("CPU: %d compute thread(s) per process, %d loader worker(s)", threads, workers)
    built = _build_model(variant, data.class_map, cfg, start, weights_file)
    del weights_file  # free the file's tensors (copied into the model)
    if cfg.drop_path:
        built.model.set_drop_path(cfg.drop_path)  # backbone stochastic depth, ramped over the blocks
    if cfg.grad_checkpointing:
        built.model.set_grad_checkpointing(True)
    train_loader, val_loader = build_loaders(
        run, data, variant, built.card.resolution, built.card.preprocess, acc, workers
    )
    evaluator = None
    if val_loader is not None:
        from rfdetr_train.evaluation.evaluator import Evaluator

        evaluator = Evaluator.from_config(
            data.coco_gt("val"), run.eval, class_map=data.class_map, accelerator=acc, training=True
        )
    if resume_state is None:
        run_dir = Path(
            _broadcast(acc, str(new_run_dir(cfg.output, cfg.name)) if acc.is_main_process else None)
        )
    if acc.is_main_process:
        atomic_write_text(run_dir / "config.yaml", dump_yaml(run))
        log.info("run directory: %s", run_dir)
        if resume_state is not None:
            what = f"resuming at {resume_position(resume_state)}"
        elif cfg.weights is None:
            what = "from random weights"
        else:
            what = f"from {weights_label(cfg.weights)}"
        log.info(
            "training %s (%s recipe, %s) at %dx%d on %s: %d classes, %d train images, batch %d x %d accum x %d "
            "processes, mixed precision %s",
            variant.name, cfg.recipe, what, built.card.resolution[0], built.card.resolution[1], acc.device,
            len(data.class_map), len(train_loader.dataset), cfg.batch_size, cfg.grad_accum, acc.num_processes,
            acc.mixed_precision,
        )  # fmt: skip
    parts = Parts(
        accelerator=acc,
        variant=variant,
        model=built.model,
        card=built.card,
        data=data,
        train_loader=train_loader,
        val_loader=val_loader,
        # K: the model's logit slots (class_map.num_slots), the one count model and criterion share
        criterion=build_criterion_for(variant, built.model.num_slots, **recipes.criterion_options(cfg)),
        evaluator=evaluator,
    )
    result = Trainer(run, run_dir, parts, resume_state).fit()
    if acc.is_main_process and result.history:
        log.info("%s", history_table(result.history))
    if acc.is_main_process:
        line = best_weights_line(result, cfg.metric)
        if line:
            log.info("%s", line)
    return result


def _build_model(variant, class_map, cfg, start, weights_file=None):
    """:func:`~rfdetr_train.engine.setup.build_train_model`; when the weights were chosen for the user
    (no ``--weights``), a failed download also says how to train without them."""
    from rfdetr_core.weights.download import DownloadError
    from rfdetr_train.engine.setup import build_train_model

    try:
        return build_train_model(variant, class_map, weights_file or cfg.weights, cfg.parsed_resolution())
    except DownloadError as exc:
        if start is None or start.chosen is None:
            raise
        raise DownloadError(
            f"{exc} ({variant.name}'s official weights are {start.chosen}; --weights PATH takes a file you have, "
            "--weights none trains from random weights.)"
        ) from exc


def weights_label(weights: str) -> str:
    """``the official seg-nano COCO weights`` for an official name, else the path as given."""
    from rfdetr_core.weights.download import resolve_official_name

    if not Path(weights).expanduser().is_file():
        official = resolve_official_name(weights)
        if official is not None:
            return f"the official {official.name} COCO weights"
    return weights


def best_weights_line(result, metric: str) -> str | None:
    """The run's last line: where the best weights are, with their metric value and step."""
    best = result.best_weights
    if not best.is_file():
        return None
    if result.best_step is None or result.best_metric is None:
        return f"best weights: {best} (no validation: the weights of step {result.step})"
    return f"best weights: {best} ({metric} {result.best_metric:.4f} at step {result.best_step})"


def history_table(history: list) -> str:
    """The end-of-run "AP50 over time" table of ``TrainResult.history`` (``[step, seconds, metrics]`` rows):
    one line per validation with the seconds since the start of training and the segm / bbox AP50."""

    def ap50(metrics: dict, kind: str) -> str:
        value = metrics.get(kind, {}).get("AP50")
        return "-" if value is None else f"{float(value):.3f}"

    lines = [
        "AP50 over time (validation split):",
        f"{'step':>8}  {'seconds':>8}  {'segm AP50':>9}  {'bbox AP50':>9}",
    ]
    for step, seconds, metrics in history:
        lines.append(
            f"{int(step):>8}  {float(seconds):>8.1f}  {ap50(metrics, 'segm'):>9}  {ap50(metrics, 'bbox'):>9}"
        )
    return "\n".join(lines)
