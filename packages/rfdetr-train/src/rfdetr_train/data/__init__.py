"""Datasets, augmentation and the dataset checker of rfdetr-train.

Interface for the training engine and the evaluator (names are importable from ``rfdetr_train.data``;
submodules load lazily, so ``rfdetr-train check`` stays light)::

    from rfdetr_train.data import load_from_config, build_train_loader, build_val_loader

    data = load_from_config(cfg.data, max_instances=variant.num_queries)  # or load_dataset("path/")
    data.class_map            # rfdetr_core ClassMap: slot (contiguous training id) <-> category id <-> name
    data.splits               # {"train": CheckedSplit, "val": ..., "test": ...} (those found)
    data.coco_gt("val")       # pycocotools COCO of the split, the dataset's own ids (YOLO too)
    data.coco_dict("val")     # the same as a dict

    train = build_train_loader(data, resolution=variant.resolution, size_multiple=variant.size_multiple,
                               batch_size=4, seed=cfg.seed, workers=2, transforms=cfg.data.transforms,
                               multi_scale=cfg.data.multi_scale)
    train.load_state_dict(state)             # resume: same batches as the interrupted run
    for batch in train:                      # one epoch per iter(); len(train) batches
        batch = batch.to(device)             # Batch: images [B,3,H,W] normalised, targets list[dict]
        ...
        train.sampler.global_step            # batches consumed so far (multi-scale size is a function of it)
        train.timing.data_wait, train.timing.compute   # seconds waiting for data vs between batches
    state = train.state_dict()               # {"epoch", "batch", "seed", ...} for the checkpoint

    val = build_val_loader(data, resolution=variant.resolution, batch_size=8, split="val", limit=None)
    val.image_ids                            # the images covered (limit = first N)

Several processes: pass ``rank=`` / ``world_size=`` to both builders (each rank gets a disjoint slice of
every global batch, all ranks the same multi-scale size) and do not hand these loaders to
``accelerator.prepare`` (it would shard them a second time). Call :func:`load_from_config` on the main
process first (``accelerator.main_process_first()``) so the synthetic dataset is generated once (a file lock
makes it safe anyway). ``data.report()`` is the ``check`` report of what was loaded (with ``skip_invalid``:
what was dropped); print it with ``rfdetr_train.data.report.format_report``.

Targets (one dict per image): ``labels [N]`` int64 training ids, ``boxes [N, 4]`` normalised cxcywh (the
extents of the augmented masks), ``masks [N, H, W]`` bool at the input size, ``image_id`` (int, the
dataset's), ``orig_size`` int64 [2] (source h, w), ``size`` int64 [2] (input h, w). Crowd annotations are
not targets (COCO practice) but stay in ``coco_gt``. Images without annotations give N = 0.

Randomness: the sample of dataset index i in epoch e uses ``numpy.random.default_rng((seed, e, i))``; the
batch order of epoch e uses ``default_rng((seed, e))``; the multi-scale size of global step s uses
``random.Random(seed * 1000003 + s)``. Workers, prefetching and restarts do not change any batch.

Formats (:func:`load_dataset` / ``--data``): COCO JSON; a folder of ``train.json``/``val.json``/``test.json``;
Roboflow COCO exports; YOLO-seg ``data.yaml``, ``names.txt`` or a folder with ``images/``, ``labels/`` and
``names.txt``; explicit ``train_ann``/``val_ann``/``test_ann`` + ``images``. Without any, training uses the
built-in synthetic dataset (:func:`rfdetr_train.data.synthetic.synthetic_dataset_dir`).

Errors in the data raise :class:`DatasetError` (an ``RFDETRError``) listing them, unless ``skip_invalid``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "config",
    "DatasetError": "findings",
    "Finding": "findings",
    "LoadedDataset": "load",
    "load_dataset": "load",
    "load_from_config": "load",
    "build_train_loader": "load",
    "build_val_loader": "load",
    "build_train_transform": "load",
    "default_workers": "load",
    "Batch": "loaders",
    "collate": "loaders",
    "TrainLoader": "loaders",
    "ValLoader": "loaders",
    "LoaderTiming": "loaders",
    "timed": "loaders",
    "ResumableBatchSampler": "sampler",
    "InstanceDataset": "dataset",
    "SampleKey": "dataset",
    "masks_to_boxes": "dataset",
    "TrainTransform": "transforms",
    "ValTransform": "transforms",
    "multi_scale_sizes": "transforms",
    "load_pipeline": "albumentations_pipeline",
    "synthetic_dataset_dir": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
