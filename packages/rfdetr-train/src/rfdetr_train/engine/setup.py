"""Everything a run needs, built from a resolved :class:`~rfdetr_train.config.RunConfig`.

The accelerator (device, processes, mixed precision), the dataset and its loaders (sharded per process), the
model (random init or ``--weights``, heads sized to the dataset's classes), the criterion and the evaluator.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rfdetr_core.class_map import ClassMap
from rfdetr_core.errors import RFDETRError
from rfdetr_core.factory import card_for
from rfdetr_core.model_card import ModelCard
from rfdetr_core.preprocess import PreprocessConfig
from rfdetr_core.variants import Variant, get_variant

if TYPE_CHECKING:
    from accelerate import Accelerator

    from rfdetr_core.models import RFDETRModel
    from rfdetr_core.weights.files import WeightsFile
    from rfdetr_train.data.load import LoadedDataset
    from rfdetr_train.data.loaders import TrainLoader, ValLoader
    from rfdetr_train.engine.config import TrainConfig
    from rfdetr_train.evaluation.evaluator import Evaluator
    from rfdetr_train.losses import SetCriterion

log = logging.getLogger("rfdetr_train")

DEFAULT_VARIANT = "seg-tiny"


def pick_mixed_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA cards with native bf16, fp16 on older cards, fp32 (``no``) on CPU."""
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise RFDETRError(
                "fp16 mixed precision needs a CUDA device; set mixed_precision to bf16 or no (in --config "
                "FILE.yaml or train(mixed_precision=...)) on CPU."
            )
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "no"


def make_accelerator(device: str | None, mixed_precision: str, grad_accum: int):
    """An ``accelerate.Accelerator`` on ``device`` (``cpu``, ``cuda``, ``cuda:1``; None = Accelerate's choice).

    ``accelerate launch`` decides the device of each process; ``--device`` then may only say ``cpu``/``cuda``.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = device is not None and device.strip().lower() == "cpu"
    if device and not cpu:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RFDETRError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if dev.index is not None and not launched:
            # a single process on a chosen card; under `accelerate launch` each process picks its own card
            os.environ["ACCELERATE_TORCH_DEVICE"] = str(dev)
    probe = torch.device("cpu") if cpu or not torch.cuda.is_available() else torch.device("cuda")
    # Every parameter takes part in every step (the criterion keeps empty-target images in the graph), so
    # DDP does not need the slow unused-parameter search.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    return Accelerator(
        cpu=cpu,
        mixed_precision=pick_mixed_precision(mixed_precision, probe),
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=[ddp],
        step_scheduler_with_optimizer=False,
    )


def read_initial_weights(weights: str | None) -> WeightsFile | None:
    """``--weights`` read once for the whole setup: the file's content, or ``None`` without weights or for an
    official name (which :func:`build_train_model` downloads)."""
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        return None
    from rfdetr_core.weights.files import read_weights_file

    return read_weights_file(path)


def resolve_variant(
    model: str | None, weights: str | None, num_queries: int | None, weights_file: WeightsFile | None = None
) -> Variant:
    """The variant: ``--model``, else the one the weights file (``weights_file``, read by
    :func:`read_initial_weights`) or official name says, else seg-tiny."""
    if model is not None:
        v = get_variant(model)
    elif weights_file is not None:
        if weights_file.variant is None:
            raise RFDETRError(f"{weights}: cannot tell which variant these weights are for; pass --model.")
        v = get_variant(weights_file.variant)
    elif weights is not None:
        from rfdetr_core.weights.download import resolve_official_name

        v = resolve_official_name(weights)
        if v is None:
            raise RFDETRError(
                f"--weights {weights!r}: no such file, and not the name of official weights (e.g. seg-nano)."
            )
    else:
        v = get_variant(DEFAULT_VARIANT)
    if num_queries is not None and num_queries != v.num_queries:
        v = v.with_overrides(num_queries=num_queries)
    return v


@dataclass
class Parts:
    """What the :class:`~rfdetr_train.engine.trainer.Trainer` runs on: the pieces of one run, built in
    :func:`rfdetr_train.engine.api.train` by the functions of this module."""

    accelerator: Accelerator
    variant: Variant
    model: RFDETRModel
    card: ModelCard
    data: LoadedDataset
    train_loader: TrainLoader
    val_loader: ValLoader | None
    criterion: SetCriterion
    evaluator: Evaluator | None


@dataclass
class ModelSetup:
    """The model to train and its card (the run's one record of variant, resolution, preprocessing, classes)."""

    model: nn.Module
    card: ModelCard


def build_train_model(
    variant: Variant,
    class_map: ClassMap,
    weights: str | WeightsFile | None,
    resolution: tuple[int, int] | None,
) -> ModelSetup:
    """The model to train for ``class_map`` (the dataset's classes): random init, or ``weights`` (an official
    name, or a file already read) with the class heads resized to ``class_map.num_slots``."""
    if weights is None:
        from rfdetr_core.factory import build_model

        model = build_model(variant, num_classes=class_map.num_slots, num_queries=variant.num_queries)
        res = resolution or (variant.resolution, variant.resolution)
        preprocess = PreprocessConfig()
    else:
        from rfdetr_core.factory import load_model

        loaded = load_model(variant.name, weights=weights, class_map=class_map)
        model = loaded.model
        if model.num_queries != variant.num_queries:
            raise RFDETRError(
                f"--num-queries {variant.num_queries} differs from the {model.num_queries} queries of "
                f"{loaded.source or weights}; fine-tuning keeps the file's query count."
            )
        res = resolution or loaded.resolution
        preprocess = loaded.preprocess
    variant.check_resolution(*res)
    return ModelSetup(model, card_for(model, variant, class_map, tuple(res), preprocess))


def load_data(run, variant: Variant, only_splits: tuple[str, ...] | None = None):
    """The checked dataset of ``run.data`` (the synthetic one without a path) and its class map;
    ``only_splits`` keeps just the splits the caller reads (``val --split test``)."""
    from rfdetr_train.data import load_from_config

    return load_from_config(run.data, max_instances=variant.num_queries, only_splits=only_splits)


def build_loaders(
    run, data, variant: Variant, resolution, preprocess: PreprocessConfig, accelerator, workers: int
):
    """Training and validation loaders of this process's shard (validation: ``None`` without a val split).

    ``workers``: loader processes, as resolved by :func:`rfdetr_train.engine.api.loader_workers`."""
    from rfdetr_train.data import build_train_loader

    cfg = run.train
    pin = accelerator.device.type == "cuda"
    train_loader = build_train_loader(
        data,
        resolution=resolution,
        size_multiple=variant.size_multiple,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        workers=workers,
        transforms=run.data.transforms,
        multi_scale=run.data.multi_scale,
        multi_scale_steps=run.data.multi_scale_steps,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        preprocess=preprocess,
        pin_memory=pin,
    )
    val_loader = None
    if "val" in data.splits:
        val_loader = build_validation_loader(
            data, "val", cfg, resolution, preprocess, accelerator, workers, limit=cfg.test_limit
        )
    else:
        log.warning("The dataset has no validation split: no validation, best.safetensors = last weights.")
    return train_loader, val_loader


def build_validation_loader(
    data,
    split: str,
    train: TrainConfig,
    resolution: tuple[int, int],
    preprocess: PreprocessConfig,
    accelerator,
    workers: int,
    *,
    batch_size: int | None = None,
    limit: int | None = None,
):
    """The loader of ``split`` for validation, with the same defaults in training and in ``val``.

    Args:
        train: the recipe-resolved training options: ``val_batch_size``, else twice ``batch_size``.
        workers: the training loader's processes (:func:`rfdetr_train.engine.api.loader_workers`); validation
            uses at most 2 of them.
        batch_size: an explicit validation batch (``val --batch-size``), else the default above.
        limit: the first ``limit`` images only (``--test-limit``).
    """
    from rfdetr_train.data import build_val_loader

    return build_val_loader(
        data,
        resolution=resolution,
        batch_size=batch_size or train.val_batch_size or 2 * train.batch_size,
        split=split,
        limit=limit,
        workers=min(workers, 2),
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        preprocess=preprocess,
        pin_memory=accelerator.device.type == "cuda",
    )


def build_criterion_for(variant: Variant, num_slots: int, **options):
    """The criterion of ``variant`` for ``num_slots`` class slots ``K`` (the model's ``num_slots``);
    ``options`` (loss weights, matching costs) override upstream's defaults."""
    from rfdetr_train.losses import build_criterion

    return build_criterion(num_slots, variant.group_detr, segmentation=variant.is_segmentation, **options)
