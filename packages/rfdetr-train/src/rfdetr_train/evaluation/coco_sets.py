"""Ground truth and detections as flat arrays, the input of both COCO evaluation backends.

Boxes are COCO ``[x, y, w, h]`` in source pixels; masks are compressed COCO RLE dicts at source size.

Areas (they decide the small / medium / large ranges) follow pycocotools: ground truth uses the annotation's
own ``area`` field. A detection's area depends on where the detections come from (``DetectionSet.area_rule``):

- ``"per-type"`` (model outputs: training-time validation, ``val``): ``w * h`` for ``bbox`` and the mask area
  for ``segm``, i.e. what pycocotools gives on a box-only file and a segmentation-only file evaluated
  separately (upstream rfdetr and detectron2 write their segm results without ``bbox`` for this reason).
- ``"box"`` / ``"mask"`` (a results file): pycocotools' ``COCO.loadRes`` looks at the file's *first* result
  only; if it has a non-empty ``bbox``, every detection's area is ``bbox[2] * bbox[3]``, otherwise the mask
  area, and the same area serves both iouTypes. A file with both keys therefore has box areas for segm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rfdetr_core.errors import RFDETRError

AREA_RULES = ("per-type", "box", "mask")


@dataclass
class GroundTruthSet:
    """All ground-truth annotations of a dataset (the dataset's own image, category and annotation ids).

    Attributes:
        image_id, category_id, ann_id: ``[G]`` int64.
        area: ``[G]`` float64, the annotation's ``area`` field.
        iscrowd: ``[G]`` bool.
        bbox: ``[G, 4]`` float64 xywh.
        rles: ``G`` compressed RLE dicts (``None`` until :meth:`ensure_rles`; polygons are rasterised then).
        image_sizes: image id -> (height, width).
        categories: category id -> name, in the dataset's order.
        coco: the ``pycocotools.coco.COCO`` object it came from (rasterisation, reference backend).
    """

    image_id: np.ndarray
    category_id: np.ndarray
    ann_id: np.ndarray
    area: np.ndarray
    iscrowd: np.ndarray
    bbox: np.ndarray
    image_sizes: dict[int, tuple[int, int]]
    categories: dict[int, str]
    coco: object
    rles: list | None = None
    boundaries: dict = field(default_factory=dict)  # (ratio, row) -> boundary RLE, filled on demand

    @classmethod
    def from_coco(cls, gt) -> GroundTruthSet:
        """From a ``pycocotools.coco.COCO`` object or a COCO dict (a dict is indexed without printing)."""
        coco = coco_from_dict(gt) if isinstance(gt, dict) else gt
        anns = list(coco.anns.values())
        n = len(anns)
        bbox = np.zeros((n, 4), dtype=np.float64)
        for i, a in enumerate(anns):
            bbox[i] = a.get("bbox", (0.0, 0.0, 0.0, 0.0))
        return cls(
            image_id=np.array([a["image_id"] for a in anns], dtype=np.int64),
            category_id=np.array([a["category_id"] for a in anns], dtype=np.int64),
            ann_id=np.array([a["id"] for a in anns], dtype=np.int64),
            area=np.array([float(a.get("area", 0.0)) for a in anns], dtype=np.float64),
            iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
            bbox=bbox,
            image_sizes={int(i): (int(im["height"]), int(im["width"])) for i, im in coco.imgs.items()},
            categories={
                int(c["id"]): str(c.get("name", c["id"])) for c in coco.dataset.get("categories", [])
            },
            coco=coco,
        )

    def ensure_rles(self) -> list:
        """Compressed RLE of every annotation (polygons and uncompressed RLE converted once)."""
        if self.rles is None:
            self.rles = [self.coco.annToRLE(a) for a in self.coco.anns.values()]
        return self.rles


@dataclass
class DetectionSet:
    """Detections of many images.

    Attributes:
        image_id, category_id: ``[D]`` int64 (dataset ids).
        score: ``[D]`` float64.
        bbox: ``[D, 4]`` float64 xywh in source pixels.
        rles: ``D`` compressed RLE dicts at source size, or ``None`` for box-only results.
        mask_area: ``[D]`` float64 mask areas (``None`` without masks).
        area_rule: which area the size ranges use, ``"per-type"``, ``"box"`` or ``"mask"`` (module doc).
    """

    image_id: np.ndarray
    category_id: np.ndarray
    score: np.ndarray
    bbox: np.ndarray
    rles: list | None = None
    mask_area: np.ndarray | None = None
    boundary_rles: list | None = None  # inner boundaries (Boundary AP), when computed with the masks
    area_rule: str = "per-type"

    def __post_init__(self) -> None:
        if self.area_rule not in AREA_RULES:
            raise RFDETRError(f"area_rule must be one of {AREA_RULES}, got {self.area_rule!r}")
        if self.area_rule == "mask" and self.mask_area is None:
            raise RFDETRError("area_rule 'mask' needs mask areas.")

    def __len__(self) -> int:
        return int(self.score.shape[0])

    @classmethod
    def empty(cls, with_masks: bool) -> DetectionSet:
        z = np.zeros(0, dtype=np.int64)
        return cls(
            z,
            z.copy(),
            np.zeros(0),
            np.zeros((0, 4)),
            [] if with_masks else None,
            np.zeros(0) if with_masks else None,
        )

    def area(self, iou_type: str) -> np.ndarray:
        """``[D]`` float64 areas for the size ranges of ``iou_type`` under :attr:`area_rule` (module doc)."""
        if iou_type == "segm" and self.mask_area is None:
            raise RFDETRError("Mask metrics need detections with masks ('segmentation' in the results).")
        box_area = self.area_rule == "box" or (self.area_rule == "per-type" and iou_type == "bbox")
        return self.bbox[:, 2] * self.bbox[:, 3] if box_area else self.mask_area

    @classmethod
    def concatenate(cls, parts: list[DetectionSet]) -> DetectionSet:
        parts = [p for p in parts if len(p)] or parts[:1]
        if not parts:
            return cls.empty(with_masks=False)
        with_masks = all(p.rles is not None for p in parts)
        with_bounds = with_masks and all(p.boundary_rles is not None for p in parts)
        rules = {p.area_rule for p in parts}
        if len(rules) > 1:
            raise RFDETRError(f"Cannot join detections with different area rules {sorted(rules)}.")
        return cls(
            np.concatenate([p.image_id for p in parts]).astype(np.int64),
            np.concatenate([p.category_id for p in parts]).astype(np.int64),
            np.concatenate([p.score for p in parts]).astype(np.float64),
            np.concatenate([p.bbox.reshape(-1, 4) for p in parts]).astype(np.float64),
            [r for p in parts for r in p.rles] if with_masks else None,
            np.concatenate([p.mask_area for p in parts]).astype(np.float64) if with_masks else None,
            [r for p in parts for r in p.boundary_rles] if with_bounds else None,
            rules.pop(),
        )

    def to_coco_results(self, iou_type: str | None = None) -> list[dict]:
        """COCO results list (``bbox`` and, with masks, ``segmentation``; ``iou_type='segm'`` drops bbox).

        Under the ``"per-type"`` rule, pycocotools gives this set's numbers on ``to_coco_results("bbox")``
        and ``to_coco_results("segm")``; a file with both keys has box areas for segm (module doc).
        """
        out = []
        for i in range(len(self)):
            r = {
                "image_id": int(self.image_id[i]),
                "category_id": int(self.category_id[i]),
                "score": float(self.score[i]),
            }
            if iou_type != "segm":
                r["bbox"] = [float(v) for v in self.bbox[i]]
            if self.rles is not None and iou_type != "bbox":
                rle = self.rles[i]
                counts = rle["counts"]
                r["segmentation"] = {
                    "size": list(rle["size"]),
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                }
            out.append(r)
        return out


def coco_from_dict(dataset: dict):
    """A ``pycocotools.coco.COCO`` indexed from an in-memory dict, without pycocotools' prints."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
