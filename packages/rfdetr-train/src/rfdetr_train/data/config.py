"""Data section of the rfdetr-train configuration: where the dataset is and how it is augmented."""

from __future__ import annotations

from pydantic import Field

from rfdetr_train.config_base import ConfigSection


class DataConfig(ConfigSection):
    """Dataset location, format and augmentation (CLI flags in brackets).

    ``path`` [--data]: a COCO JSON, a folder of split JSONs, a Roboflow export, a YOLO ``data.yaml`` /
    folder / ``names.txt``; ``None`` means the built-in synthetic dataset (seed ``synthetic_seed``).
    ``images``, ``train_ann``, ``val_ann``, ``test_ann`` [--images, --train-ann, --val-ann]: the explicit layout.
    ``skip_invalid`` [--skip-invalid]: drop invalid annotations/images (counted in the report) instead of
    stopping. ``transforms``: ``"builtin"`` (upstream's recipe, fast path), ``"default"`` / ``"strong"`` (the
    shipped Albumentations YAML files), ``"none"`` (resize only) or a path to a YAML pipeline.
    ``multi_scale``: per-batch sizes of ``resolution +- multi_scale_steps * size_multiple``.
    ``workers`` [--workers]: loader processes (``None``: min(4, CPUs - 1)).
    """

    path: str | None = None
    images: str | None = None
    train_ann: str | None = None
    val_ann: str | None = None
    test_ann: str | None = None
    skip_invalid: bool = False
    check_files: bool = True
    transforms: str = "builtin"
    multi_scale: bool = True
    multi_scale_steps: int = Field(5, ge=0, le=20)
    workers: int | None = Field(None, ge=0)
    synthetic_seed: int = Field(0, ge=0)
