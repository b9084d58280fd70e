"""The map-style dataset that turns one image and its annotations into a training or validation sample.

Everything is lazy: the constructor only packs the annotations (polygons as float32 arrays); images are
decoded and masks rasterised per sample, at the size the sample needs, so host memory does not grow while
a run iterates. A sample is keyed by :class:`SampleKey` (index, epoch, output size), which the batch sampler
produces; its randomness comes from ``numpy.random.default_rng((seed, epoch, index))``, so a resumed run
sees the same samples.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from rfdetr_core.class_map import ClassMap
from rfdetr_core.preprocess import PreprocessConfig, open_image, resize_normalize, to_float_rgb
from rfdetr_train.data.albumentations_pipeline import AlbumentationsTransform
from rfdetr_train.data.findings import DatasetError
from rfdetr_train.data.masks import decode, rasterize_polygons
from rfdetr_train.data.shared_memory import shared_empty
from rfdetr_train.data.transforms import GeometricPlan, TrainTransform, ValTransform


class SampleKey(NamedTuple):
    """Which sample to build: dataset ``index``, ``epoch`` (for its randomness) and output ``size`` (H, W)."""

    index: int
    epoch: int
    size: tuple[int, int]


class _Instance(NamedTuple):
    slot: int
    # polygons: tuple of [K, 2] float32 arrays (x, y, source pixels); or a COCO RLE dict
    segmentation: tuple | dict


class _ImageRecord(NamedTuple):
    image_id: int
    file_name: str
    height: int
    width: int
    instances: tuple[_Instance, ...]


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """bool ``[N, H, W]`` -> boxes ``[N, 4]`` normalised cxcywh (mask extents, pixel edges).

    Empty masks give degenerate boxes; drop them first (see :func:`_extents`)."""
    return _boxes_from_extents(*_extents(masks), *masks.shape[1:])


def _extents(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[N, H, W]`` -> (rows ``[N, H]``, cols ``[N, W]``): which rows / columns each mask touches."""
    return masks.any(dim=2), masks.any(dim=1)


def _boxes_from_extents(rows: torch.Tensor, cols: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if rows.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    ar_h = torch.arange(h, dtype=torch.float32)
    ar_w = torch.arange(w, dtype=torch.float32)
    big = float(max(h, w) + 1)
    y0 = torch.where(rows, ar_h, big).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1.0).amax(dim=1) + 1
    x0 = torch.where(cols, ar_w, big).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1.0).amax(dim=1) + 1
    return torch.stack([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], dim=1)


class InstanceDataset(torch.utils.data.Dataset):
    """Instance-segmentation samples of one split.

    Args:
        coco: checked COCO instance dict (dataset ids; crowd annotations are left out of the targets, as
            COCO training does, but stay in the evaluation ground truth).
        image_root: folder the images' ``file_name`` is relative to.
        class_map: maps category ids to training ids (slots).
        transform: :class:`TrainTransform`, :class:`ValTransform` or an
            :class:`~rfdetr_train.data.albumentations_pipeline.AlbumentationsTransform`.
        size: default output size (H, W), used when indexed by a plain ``int``.
        seed: base of the per-sample random generators.
        preprocess: normalisation and resize settings (the model's, recorded in its checkpoint).

    ``dataset[key]`` returns ``{"image": [3, H, W] float32 normalised, "target": {...}, "dropped": int}``
    with the target ``labels [N]`` int64 training ids, ``boxes [N, 4]`` normalised cxcywh, ``masks
    [N, H, W]`` bool, ``image_id`` (int), ``orig_size`` int64 [2] (source h, w), ``size`` int64 [2] (H, W);
    ``dropped`` counts instances that vanished under augmentation.
    """

    def __init__(
        self,
        coco: dict,
        image_root: str | Path,
        class_map: ClassMap,
        transform: TrainTransform | ValTransform | AlbumentationsTransform,
        size: tuple[int, int],
        *,
        seed: int = 0,
        preprocess: PreprocessConfig | None = None,
    ):
        self.image_root = Path(image_root)
        self.transform = transform
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.preprocess = preprocess or PreprocessConfig()
        by_image: dict = {im["id"]: [] for im in coco["images"]}
        for a in coco["annotations"]:
            if a.get("iscrowd", 0) or a["image_id"] not in by_image:
                continue
            seg = a["segmentation"]
            if isinstance(seg, list):  # flat [x1, y1, ...] lists -> [K, 2] arrays, 8x smaller than floats
                seg = tuple(np.asarray(p, dtype=np.float32).reshape(-1, 2) for p in seg)
            by_image[a["image_id"]].append(_Instance(class_map.slot(a["category_id"]), seg))
        self.records = [
            _ImageRecord(
                im["id"], im["file_name"], int(im["height"]), int(im["width"]), tuple(by_image[im["id"]])
            )
            for im in coco["images"]
        ]

    def __len__(self) -> int:
        return len(self.records)

    def rng(self, index: int, epoch: int) -> np.random.Generator:
        """The generator of one sample in one epoch (independent of worker, batch and order)."""
        return np.random.default_rng((self.seed, int(epoch), int(index)))

    def __getitem__(self, key: int | SampleKey) -> dict:
        if not isinstance(key, SampleKey):
            key = SampleKey(int(key), 0, self.size)
        rec = self.records[key.index]
        rng = self.rng(key.index, key.epoch)
        if isinstance(self.transform, AlbumentationsTransform):
            image, masks, labels = self._albumentations(rec, key, rng)
        else:
            plan = self.transform.plan((rec.height, rec.width), tuple(key.size), rng)
            image, masks, labels = self._planned(rec, plan)
        rows, cols = _extents(masks)
        keep = rows.any(dim=1)  # instances still visible after augmentation
        h, w = image.shape[-2:]
        if not bool(keep.all()):  # (indexing copies, so only when something vanished)
            masks, labels, rows, cols = masks[keep], labels[keep], rows[keep], cols[keep]
        target = {
            "labels": labels,
            "boxes": _boxes_from_extents(rows, cols, h, w),
            "masks": masks,
            "image_id": rec.image_id,
            "orig_size": torch.tensor([rec.height, rec.width], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
        }
        return {"image": image, "target": target, "dropped": int((~keep).sum())}

    # -- the two pipelines ----------------------------------------------------------------------------
    def _open(self, rec: _ImageRecord, min_size: tuple[int, int] | None):
        path = self.image_root / rec.file_name
        img, source_size = open_image(path, min_size=min_size)
        if tuple(source_size) != (rec.height, rec.width):
            raise DatasetError(
                f"{path} is {source_size[1]}x{source_size[0]} (WxH) but its annotations say "
                f"{rec.width}x{rec.height}; run `rfdetr-train check` on the dataset."
            )
        return to_float_rgb(img)  # [3, h', w'] float in [0, 1]; h' < H when JPEG draft decoding shrank it

    def _planned(self, rec: _ImageRecord, plan: GeometricPlan):
        x0, y0, x1, y1 = plan.crop
        oh, ow = plan.out_size
        image = self._open(rec, plan.decode_min_size((rec.height, rec.width)))
        dh, dw = image.shape[-2:]
        ry, rx = dh / rec.height, dw / rec.width
        crop = image[:, round(y0 * ry) : max(round(y1 * ry), round(y0 * ry) + 1),
                     round(x0 * rx) : max(round(x1 * rx), round(x0 * rx) + 1)]  # fmt: skip
        out = resize_normalize(crop, (oh, ow), self.preprocess)[0]  # [3, oh, ow]
        if plan.flip:
            out = out.flip(-1)
        # in a loader worker the masks are born in shared memory: no copy when they are sent
        masks = shared_empty((len(rec.instances), oh, ow), torch.bool)
        unflipped = replace(plan, flip=False)  # rasterise, then mirror: an exact flip, as for the image
        for i, inst in enumerate(rec.instances):
            if isinstance(inst.segmentation, tuple):
                polys = [unflipped.map_points(p) for p in inst.segmentation]
                m = torch.from_numpy(rasterize_polygons(polys, oh, ow))
            else:
                full = torch.from_numpy(decode(inst.segmentation, rec.height, rec.width))
                part = full[y0:y1, x0:x1][None, None].to(torch.uint8)  # [1, 1, ch, cw]
                m = F.interpolate(part, size=(oh, ow), mode="nearest-exact")[0, 0].bool()
            masks[i] = m.flip(-1) if plan.flip else m
        labels = torch.tensor([inst.slot for inst in rec.instances], dtype=torch.int64)
        return out, masks, labels

    def _albumentations(self, rec: _ImageRecord, key: SampleKey, rng: np.random.Generator):
        image = self._open(rec, None).permute(1, 2, 0).numpy()  # [H, W, 3] float32
        masks = []
        for inst in rec.instances:
            if isinstance(inst.segmentation, tuple):
                m = rasterize_polygons(list(inst.segmentation), rec.height, rec.width)
            else:
                m = decode(inst.segmentation, rec.height, rec.width)
            masks.append(m.astype(np.uint8))
        image, masks = self.transform(image, masks, seed=int(rng.integers(2**31 - 1)))
        oh, ow = key.size
        img_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        out = resize_normalize(img_t.clamp(0, 1), (oh, ow), self.preprocess)[0]
        if masks:
            stack = torch.from_numpy(np.stack(masks).astype(np.uint8))[None]  # [1, N, h, w]
            mt = F.interpolate(stack, size=(oh, ow), mode="nearest-exact")[0].bool()
        else:
            mt = torch.zeros((0, oh, ow), dtype=torch.bool)
        labels = torch.tensor([inst.slot for inst in rec.instances], dtype=torch.int64)
        return out, mt, labels
