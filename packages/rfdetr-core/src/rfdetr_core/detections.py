"""The per-image result of :meth:`rfdetr_core.RFDETR.predict`.

All arrays are numpy on the CPU, rows in descending score order:

* ``boxes``        ``[N, 4]`` float32, xyxy in source-image pixels,
* ``scores``       ``[N]`` float32 in (0, 1),
* ``category_ids`` ``[N]`` int64, the dataset category id of each detection (from the class map),
* ``class_names``  ``N`` strings,
* ``masks``        ``[N, H, W]`` bool at the source size (``None`` for detection-only models),
* ``rles``         ``N`` COCO RLE dicts of the same masks (``{"size": [H, W], "counts": bytes}``) when the
  masks left the device encoded (the default of ``predict`` on CUDA); ``masks`` then decodes them on first
  access, so a caller that only needs RLE (COCO results, the HTTP API) never builds the dense array.
* ``slots``        ``[N]`` int64, the model's logit slot (training id) of each detection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rfdetr_core.errors import require


@dataclass
class Detections:
    """Detections of one image (see the module docstring for shapes).

    ``image_size`` is the source ``(height, width)``; ``source`` is the input the detections came from (a
    path, PIL image, array or tensor, kept by reference, not copied) so :meth:`plot` can draw on it.
    """

    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    class_names: list[str]
    masks: np.ndarray | None
    slots: np.ndarray
    image_size: tuple[int, int]
    source: Any = field(default=None, repr=False)
    rles: list[dict] | None = field(default=None, repr=False)

    def __post_init__(self):
        n = len(self.scores)
        if self.rles is not None and len(self.rles) != n:
            raise ValueError(f"rles must hold one RLE per detection ({n}), got {len(self.rles)}")
        if self.boxes.shape != (n, 4):
            raise ValueError(f"boxes must be [{n}, 4], got {self.boxes.shape}")
        if len(self.category_ids) != n or len(self.class_names) != n or len(self.slots) != n:
            raise ValueError("scores, category_ids, class_names and slots must have one entry per detection")
        masks = self.__dict__["masks"]  # not decoded from rles here
        if masks is not None and masks.shape != (n, *self.image_size):
            raise ValueError(
                f"masks must be [{n}, {self.image_size[0]}, {self.image_size[1]}], got {masks.shape}"
            )

    def __getattribute__(self, name: str):
        # ``masks`` of an RLE-backed result is decoded once, on first access (dataclass fields have no
        # property hook; this keeps ``Detections(masks=...)`` and ``.masks`` working unchanged).
        if name == "masks":
            d = object.__getattribute__(self, "__dict__")
            if d.get("masks") is None and d.get("rles") is not None:
                from rfdetr_core.mask_rle import decode_masks

                h, w = d["image_size"]
                d["masks"] = decode_masks(d["rles"]) if d["rles"] else np.zeros((0, h, w), dtype=bool)
        return object.__getattribute__(self, name)

    def __len__(self) -> int:
        return len(self.scores)

    def __repr__(self) -> str:
        names = ", ".join(sorted(set(self.class_names))[:8])
        return f"Detections({len(self)} on a {self.image_size[1]}x{self.image_size[0]} image: {names})"

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO results (one dict per detection): ``image_id``, ``category_id``, ``bbox`` [x, y, w, h],
        ``score`` and, with masks, ``segmentation`` as compressed RLE (``counts`` a str; the same RLE as
        ``pycocotools.mask.encode``, computed by :func:`rfdetr_core.mask_rle.encode_masks`, or the RLE the
        masks came back as)."""
        rles = self.rles
        if rles is None and self.masks is not None and len(self):
            from rfdetr_core.mask_rle import encode_masks

            rles = encode_masks(self.masks)  # [N, H, W] bool -> N RLEs
        results = []
        for i in range(len(self)):
            x0, y0, x1, y1 = (float(v) for v in self.boxes[i])
            item = {
                "image_id": int(image_id),
                "category_id": int(self.category_ids[i]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(self.scores[i]),
            }
            if rles is not None:
                rle = dict(rles[i])
                rle["counts"] = rle["counts"].decode("ascii")
                item["segmentation"] = rle
            results.append(item)
        return results

    def to_supervision(self):
        """A ``supervision.Detections`` (xyxy, confidence, class_id = category id, mask, ``data["class_name"]``).

        Needs the optional ``supervision`` package (``pip install 'rfdetr-core[supervision]'``).
        """
        sv = require("supervision", "supervision", "rfdetr-core")
        return sv.Detections(
            xyxy=self.boxes.astype(np.float32),
            confidence=self.scores.astype(np.float32),
            class_id=self.category_ids.astype(int),
            mask=self.masks,
            data={"class_name": np.array(self.class_names, dtype=str)},
        )

    def plot(self, image: Any = None, show_masks: bool = True, show_labels: bool = True):
        """The image with masks, boxes and labels drawn, as a PIL RGB image.

        ``image`` defaults to the source the detections came from; any input :mod:`rfdetr_core.preprocess`
        accepts works.
        """
        from rfdetr_core.drawing import draw_detections

        image = self.source if image is None else image
        if image is None:
            raise ValueError("No image to draw on: pass one, e.g. detections.plot(image).")
        return draw_detections(image, self, show_masks=show_masks, show_labels=show_labels)

    def save(self, path: str | os.PathLike, image: Any = None) -> Path:
        """Write :meth:`plot` to ``path`` (format from the extension); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.plot(image).save(path)
        return path
