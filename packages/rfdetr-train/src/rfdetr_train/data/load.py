"""Load a dataset the way training does (resolve, check, class map) and build its loaders.

This is the engine's entry point; see :mod:`rfdetr_train.data` for the whole interface.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rfdetr_core.class_map import ClassMap
from rfdetr_core.preprocess import PreprocessConfig
from rfdetr_train.data.checks import DEFAULT_MAX_INSTANCES, CheckedSplit, check_dataset, grouping_categories
from rfdetr_train.data.config import DataConfig
from rfdetr_train.data.dataset import InstanceDataset
from rfdetr_train.data.findings import UNSKIPPABLE, DatasetError, FindingList, raise_for_errors
from rfdetr_train.data.layout import DatasetSource
from rfdetr_train.data.loaders import TrainLoader, ValLoader
from rfdetr_train.data.sampler import ResumableBatchSampler
from rfdetr_train.data.sources import resolve_dataset
from rfdetr_train.data.transforms import TrainTransform, ValTransform, multi_scale_sizes


@dataclass
class LoadedDataset:
    """A checked dataset: ``splits`` (name -> :class:`CheckedSplit`), the ``class_map`` (slot = contiguous
    training id <-> dataset category id <-> name, categories of all splits sorted by id) and the ``source``
    (layout, findings)."""

    source: DatasetSource
    splits: dict[str, CheckedSplit]
    class_map: ClassMap

    @property
    def findings(self):
        return self.source.findings

    def dropped_summary(self) -> str | None:
        """One line of what ``--skip-invalid`` dropped, by reason with a few ids (``None``: nothing)."""
        from rfdetr_train.data.findings import dropped_summary

        return dropped_summary(self.findings)

    def report(self) -> dict:
        """The ``rfdetr-train check`` report (JSON-able dict) of what was loaded, with the findings and, with
        ``skip_invalid``, the dropped counts; :func:`rfdetr_train.data.report.format_report` prints it."""
        from rfdetr_train.data.report import build_report

        return build_report(self.source, self.splits)

    def split(self, name: str) -> CheckedSplit:
        """The split ``name`` (``"train"``, ``"val"``, ``"test"``), or an error naming those found."""
        if name not in self.splits:
            raise DatasetError(
                f"The dataset at {self.source.root} has no '{name}' split (found: {', '.join(self.splits) or 'none'})."
                + (" Pass --val-ann, or use a folder with val.json." if name == "val" else "")
            )
        return self.splits[name]

    def coco_dict(self, name: str) -> dict:
        """Ground truth of a split as a COCO dict with the dataset's own ids (crowd annotations included),
        ``area``/``bbox``/``iscrowd`` filled where the file lacked them (also for converted YOLO data)."""
        from rfdetr_train.data.masks import to_rle

        s = self.split(name)
        sizes = {im["id"]: (im["height"], im["width"]) for im in s.coco["images"]}
        anns = []
        for a in s.coco["annotations"]:
            a = dict(a)
            a.setdefault("iscrowd", 0)
            if "area" not in a:
                a["area"] = float(s.areas.get(a["id"], 0))
            if not (isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4):
                from pycocotools import mask as mask_utils

                a["bbox"] = [
                    float(v) for v in mask_utils.toBbox(to_rle(a["segmentation"], *sizes[a["image_id"]]))
                ]
            anns.append(a)
        return {
            "images": list(s.coco["images"]),
            "annotations": anns,
            "categories": list(s.coco["categories"]),
        }

    def coco_gt(self, name: str):
        """Ground truth of a split as a ``pycocotools.coco.COCO`` (built in memory, no file)."""
        import contextlib
        import io

        from pycocotools.coco import COCO

        gt = COCO()
        gt.dataset = self.coco_dict(name)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            gt.createIndex()
        return gt

    def dataset(self, name: str, transform, size: tuple[int, int], *, seed: int = 0,
                preprocess: PreprocessConfig | None = None, limit: int | None = None) -> InstanceDataset:  # fmt: skip
        """An :class:`InstanceDataset` of split ``name`` (``limit``: only its first N images)."""
        s = self.split(name)
        coco = s.coco
        if limit is not None:
            keep = coco["images"][: max(0, int(limit))]
            ids = {im["id"] for im in keep}
            coco = {
                **coco,
                "images": keep,
                "annotations": [a for a in coco["annotations"] if a["image_id"] in ids],
            }
        return InstanceDataset(
            coco, s.source.image_root, self.class_map, transform, size, seed=seed, preprocess=preprocess
        )


def load_dataset(
    path: str | os.PathLike | None = None,
    *,
    images: str | os.PathLike | None = None,
    train_ann: str | os.PathLike | None = None,
    val_ann: str | os.PathLike | None = None,
    test_ann: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    check_files: bool = True,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    only_splits: tuple[str, ...] | None = None,
) -> LoadedDataset:
    """Resolve the layout, read every split, run the checks of ``rfdetr-train check`` and build the class map.

    ``only_splits`` (e.g. ``("test",)`` for ``val --split test``) keeps just those splits: problems in the
    others (which are never read) neither stop nor slow the run.

    Errors raise :class:`~rfdetr_train.data.findings.DatasetError` (listing them) unless ``skip_invalid``,
    which keeps the cleaned splits (bad annotations / images dropped and counted in the findings). JSON
    that does not parse and a dataset without masks always raise. ``max_instances`` is the model's query count (for the warning).
    """
    source = resolve_dataset(path, images=images, train_ann=train_ann, val_ann=val_ann, test_ann=test_ann)
    if only_splits is not None:
        missing = [k for k in only_splits if k not in source.splits]
        if missing:
            raise DatasetError(
                f"The dataset at {source.root} has no '{missing[0]}' split (found: "
                f"{', '.join(source.splits) or 'none'})."
                + (" Pass --val-ann, or use a folder with val.json." if missing[0] == "val" else "")
            )
        source.splits = {k: v for k, v in source.splits.items() if k in only_splits}
        source.findings.items = [
            f for f in source.findings.items if f.split is None or f.split in only_splits
        ]
    checked = check_dataset(source, check_files=check_files, max_instances=max_instances)
    label = str(path or train_ann or val_ann or test_ann)
    fatal = [f for f in source.findings.errors if f.code in UNSKIPPABLE]
    if fatal:
        raise_for_errors(FindingList(fatal), label)
    if not skip_invalid:
        raise_for_errors(source.findings, label)
    if not checked:
        raise DatasetError(f"The dataset at {label} has no usable split.")
    cats: dict = {}
    for s in checked.values():
        for c in s.coco["categories"]:
            cats.setdefault(c["id"], c)
    for cid in grouping_categories(checked):
        del cats[cid]
    if not cats:
        raise DatasetError(f"The dataset at {label} defines no categories.")
    return LoadedDataset(source, checked, ClassMap.from_coco_categories(cats.values()))


def load_from_config(
    cfg: DataConfig,
    *,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    only_splits: tuple[str, ...] | None = None,
) -> LoadedDataset:
    """:func:`load_dataset` from a :class:`DataConfig`; no path at all means the built-in synthetic dataset."""
    path = cfg.path
    if path is None and not (cfg.train_ann or cfg.val_ann or cfg.test_ann):
        from rfdetr_train.data.synthetic import synthetic_dataset_dir

        path = str(synthetic_dataset_dir(seed=cfg.synthetic_seed))
    return load_dataset(
        path,
        images=cfg.images,
        train_ann=cfg.train_ann,
        val_ann=cfg.val_ann,
        test_ann=cfg.test_ann,
        skip_invalid=cfg.skip_invalid,
        check_files=cfg.check_files,
        max_instances=max_instances,
        only_splits=only_splits,
    )


def default_workers() -> int:
    """min(4, CPUs - 1), at least 0."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _as_hw(resolution) -> tuple[int, int]:
    return (
        (int(resolution), int(resolution))
        if isinstance(resolution, int)
        else (int(resolution[0]), int(resolution[1]))
    )


def build_train_transform(name: str):
    """``"builtin"`` -> :class:`TrainTransform`; ``"none"`` -> resize only; ``"default"``/``"strong"``/a path
    -> the Albumentations pipeline of that YAML file."""
    if name == "builtin":
        return TrainTransform()
    if name == "none":
        return ValTransform()
    from rfdetr_train.data.albumentations_pipeline import load_pipeline

    return load_pipeline(name)


def build_train_loader(
    data: LoadedDataset,
    *,
    resolution: int | tuple[int, int],
    size_multiple: int,
    batch_size: int,
    seed: int = 0,
    workers: int = 0,
    transforms: str = "builtin",
    multi_scale: bool = True,
    multi_scale_steps: int = 5,
    split: str = "train",
    min_batches: int = 1,
    rank: int = 0,
    world_size: int = 1,
    preprocess: PreprocessConfig | None = None,
    pin_memory: bool = False,
) -> TrainLoader:
    """The training loader: augmented samples, per-step multi-scale sizes (multiples of ``size_multiple``
    around ``resolution``, e.g. ``variant.resolution`` / ``variant.size_multiple``), resumable order."""
    hw = _as_hw(resolution)
    sizes = multi_scale_sizes(hw, size_multiple, multi_scale_steps) if multi_scale else [hw]
    ds = data.dataset(split, build_train_transform(transforms), hw, seed=seed, preprocess=preprocess)
    sampler = ResumableBatchSampler(len(ds), batch_size, sizes, seed=seed, min_batches=min_batches,
                                    rank=rank, world_size=world_size)  # fmt: skip
    return TrainLoader(ds, sampler, workers=workers, pin_memory=pin_memory)


def build_val_loader(
    data: LoadedDataset,
    *,
    resolution: int | tuple[int, int],
    batch_size: int,
    split: str = "val",
    limit: int | None = None,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    preprocess: PreprocessConfig | None = None,
    pin_memory: bool = False,
) -> ValLoader:
    """The validation loader: images resized to ``resolution`` in dataset order, source sizes kept in the
    targets; ``limit`` keeps the first N images (``--test-limit``)."""
    ds = data.dataset(split, ValTransform(), _as_hw(resolution), preprocess=preprocess, limit=limit)
    return ValLoader(ds, batch_size, workers=workers, pin_memory=pin_memory, rank=rank, world_size=world_size)


def image_root_of(data: LoadedDataset, split: str) -> Path:
    """Folder the split's ``file_name`` entries are relative to."""
    return data.split(split).source.image_root
