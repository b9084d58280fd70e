"""The JSON the API returns (DESIGN.md "HTTP API"), as pydantic models for the OpenAPI schema, and the
conversion of core's :class:`~rfdetr_core.Detections` into it.

::

    {"image": {"width": 640, "height": 480}, "model": "seg-nano",
     "timing_ms": {"decode": 3.1, "queue": 4.0, "inference": 95.2, "encode": 1.2, "total": 104.8},
     "batch_size": 4,
     "detections": [{"box": [x0, y0, x1, y1], "score": 0.91, "category_id": 1, "class_name": "person",
                     "mask": {"size": [480, 640], "counts": "..."}}]}

``box`` is xyxy in source pixels; ``mask`` is COCO compressed RLE (``size`` = [height, width], column-major
runs, zeros first; decode with ``pycocotools.mask.decode``), or ``{"polygons": [[x0, y0, x1, y1, ...], ...]}``
with ``mask_format=polygon``, or absent with ``mask_format=none``.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from pydantic import BaseModel, Field

from rfdetr_core.errors import MissingDependencyError


class MaskFormat(StrEnum):
    rle = "rle"
    polygon = "polygon"
    none = "none"


class ImageSize(BaseModel):
    width: int
    height: int


class RLEMask(BaseModel):
    size: list[int] = Field(description="[height, width] of the source image")
    counts: str = Field(description="COCO compressed RLE string (column-major runs, zeros first)")


class PolygonMask(BaseModel):
    polygons: list[list[float]] = Field(
        description="outer contours, each [x0, y0, x1, y1, ...] in source pixels (pixel centres)"
    )


class Detection(BaseModel):
    box: list[float] = Field(description="[x0, y0, x1, y1] in source-image pixels")
    score: float
    category_id: int = Field(description="the dataset's category id")
    class_name: str
    mask: RLEMask | PolygonMask | None = None


class Timing(BaseModel):
    decode: float = Field(description="ms decoding the upload")
    queue: float = Field(description="ms waiting for the model (dynamic batching)")
    inference: float = Field(description="ms of the model call of this image's batch")
    encode: float = Field(description="ms converting masks to RLE / polygons")
    total: float = Field(description="ms from request received to response ready")


class Prediction(BaseModel):
    image: ImageSize
    model: str
    timing_ms: Timing
    batch_size: int = Field(description="images in the model call this image was part of")
    detections: list[Detection]

    model_config = {
        "json_schema_extra": {
            "examples": [{
                "image": {"width": 640, "height": 480},
                "model": "seg-nano",
                "timing_ms": {"decode": 3.1, "queue": 4.0, "inference": 95.2, "encode": 1.2, "total": 104.8},
                "batch_size": 4,
                "detections": [{
                    "box": [12.5, 40.0, 230.1, 470.9], "score": 0.91, "category_id": 1, "class_name": "person",
                    "mask": {"size": [480, 640], "counts": "Xc`07U>2N1O2N..."},
                }],
            }]
        }
    }


class BatchPrediction(BaseModel):
    results: list[Prediction] = Field(description="one entry per uploaded image, in upload order")


class ErrorBody(BaseModel):
    detail: str = Field(description="what is wrong and what to do")


def select(det, threshold: float, max_detections: int | None, classes: set[str] | None) -> np.ndarray:
    """Indexes (descending score) of the detections a request keeps: ``score > threshold`` (as
    ``predict``), class filter (names or category ids as strings), then the first ``max_detections``."""
    keep = det.scores > threshold
    if classes:
        names = np.asarray([n in classes or str(int(c)) in classes
                            for n, c in zip(det.class_names, det.category_ids)], dtype=bool)
        keep &= names
    idx = np.nonzero(keep)[0]
    return idx[:max_detections] if max_detections is not None else idx


def detections_json(det, idx: np.ndarray, mask_format: MaskFormat) -> list[dict]:
    """The ``detections`` list for the rows ``idx`` of ``det`` (core's ``Detections``), masks encoded with
    core's COCO RLE encoder (or traced to polygons)."""
    masks = None
    has_masks = det.rles is not None or det.masks is not None
    if has_masks and mask_format is not MaskFormat.none and len(idx):
        if mask_format is MaskFormat.rle:
            if det.rles is not None:  # predict already encoded them (on CUDA, by default)
                rles = [det.rles[i] for i in idx.tolist()]
            else:
                from rfdetr_core.mask_rle import encode_masks

                rles = encode_masks(det.masks[idx])  # [n, H, W] bool -> n RLEs
            masks = [{"size": [int(s) for s in r["size"]], "counts": _text(r["counts"])} for r in rles]
        else:
            masks = [{"polygons": mask_polygons(m)} for m in det.masks[idx]]
    out = []
    for j, i in enumerate(idx.tolist()):
        item = {
            "box": [float(v) for v in det.boxes[i]],
            "score": float(det.scores[i]),
            "category_id": int(det.category_ids[i]),
            "class_name": det.class_names[i],
        }
        if masks is not None:
            item["mask"] = masks[j]
        out.append(item)
    return out


def _text(counts: bytes | str) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a bool ``[H, W]`` mask as flat ``[x0, y0, x1, y1, ...]`` lists (OpenCV's border
    following, Suzuki & Abe 1985); contours of fewer than 3 points are dropped."""
    try:
        import cv2
    except ImportError as exc:
        raise MissingDependencyError(
            "mask_format=polygon needs OpenCV on the server: `pip install opencv-python-headless`."
        ) from exc
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]  # [P, 1, 2] -> [2P]
