"""Albumentations pipelines described in YAML, applied to the image and all instance masks together.

File format (see ``rfdetr_train/configs/transforms/default.yaml``)::

    transforms:
      - HorizontalFlip: {p: 0.5}
      - OneOf:
          p: 0.3
          transforms:
            - Blur: {blur_limit: [3, 5]}
            - GaussNoise: {}

Each entry is ``{ClassName: {keyword arguments}}`` of an ``albumentations`` transform; the composites
``OneOf``, ``SomeOf``, ``Sequential`` and ``SelectiveChannelTransform`` take a nested ``transforms`` list.
Lists become tuples. Boxes are not transformed: they are recomputed from the transformed masks, and
instances whose mask vanished are dropped (and counted) by the dataset. The pipeline runs at the source
resolution; the dataset then resizes to the step's training size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rfdetr_train.data.findings import DatasetError

COMPOSITES = ("OneOf", "SomeOf", "Sequential", "SelectiveChannelTransform")
_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "transforms"


def shipped_pipelines() -> dict[str, Path]:
    """Name -> YAML file of the pipelines shipped with the package (``default``, ``strong``)."""
    return {p.stem: p for p in sorted(_CONFIG_DIR.glob("*.yaml"))}


def resolve_pipeline_file(name_or_path: str | Path) -> Path:
    """``"default"`` / ``"strong"`` or a path to a YAML file -> the file (a clear error otherwise)."""
    shipped = shipped_pipelines()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    raise DatasetError(
        f"Transform pipeline {name_or_path!r}: not a shipped pipeline ({', '.join(shipped)}) and no such file."
    )


def _tuples(v):
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return v


def _build(entry, where: str):
    import albumentations as A

    if not isinstance(entry, dict) or len(entry) != 1:
        raise DatasetError(f"{where}: each transform is one mapping {{Name: {{arguments}}}}, got {entry!r}.")
    ((name, params),) = entry.items()
    params = dict(params or {})
    cls = getattr(A, name, None)
    if cls is None or not isinstance(cls, type):
        raise DatasetError(f"{where}: albumentations has no transform named {name!r}.")
    if name in COMPOSITES:
        children = params.pop("transforms", None)
        if not isinstance(children, list) or not children:
            raise DatasetError(f"{where}: {name} needs a non-empty 'transforms' list.")
        kids = [_build(c, f"{where} > {name}[{i}]") for i, c in enumerate(children)]
        try:
            return cls(kids, **_tuples(params))
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{where}: {name}({params}) is invalid: {exc}") from exc
    try:
        return cls(**_tuples(params))
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: {name}({params}) is invalid: {exc}") from exc


def load_pipeline(name_or_path: str | Path):
    """Read a YAML pipeline file (or a shipped name) into an ``albumentations.Compose``."""
    import yaml

    path = resolve_pipeline_file(name_or_path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: YAML does not parse: {exc}") from exc
    if not isinstance(cfg, dict) or set(cfg) != {"transforms"} or not isinstance(cfg["transforms"], list):
        raise DatasetError(f"{path}: expected one top-level key 'transforms' holding a list of transforms.")
    return AlbumentationsTransform(
        [_build(e, f"{path}: transforms[{i}]") for i, e in enumerate(cfg["transforms"])], str(path)
    )


class AlbumentationsTransform:
    """An ``albumentations.Compose`` over the image (float32 HxWx3 in [0, 1]) and its instance masks.

    Randomness comes from the seed passed per call, so a sample's augmentation depends only on
    (seed, epoch, index).
    """

    def __init__(self, transforms: list, name: str = "custom"):
        import albumentations as A

        self.name = name
        self.compose = A.Compose(transforms, p=1.0)

    def __call__(
        self, image: np.ndarray, masks: list[np.ndarray], seed: int
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """``image`` [H, W, 3] float32, ``masks`` list of [H, W] uint8 -> transformed (same order and count)."""
        self.compose.set_random_seed(seed)
        if masks:
            out = self.compose(image=image, masks=masks)
            return out["image"], list(out["masks"])
        return self.compose(image=image)["image"], []

    def __repr__(self) -> str:
        return f"AlbumentationsTransform({self.name})"
