"""Reading and checking COCO ground-truth and results files for ``rfdetr-train eval``.

Every problem raises an :class:`RFDETRError` naming the file and the first bad entry (its index and what is
wrong), so a user can fix an exporter without reading a traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from rfdetr_core.errors import RFDETRError
from rfdetr_core.mask_rle import decode_counts, rle_area
from rfdetr_train.evaluation.coco_sets import DetectionSet, GroundTruthSet


class ResultsFileError(RFDETRError):
    """A ground-truth or results file that cannot be evaluated."""


def _read_json(path: str | Path, what: str):
    p = Path(path)
    if not p.is_file():
        raise ResultsFileError(f"{what} file {p} does not exist.")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ResultsFileError(f"{what} file {p} is empty.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultsFileError(f"{what} file {p} is not valid JSON: {exc}") from None


def load_ground_truth(path: str | Path) -> GroundTruthSet:
    """A COCO annotation file -> :class:`GroundTruthSet` (checked: images, categories, annotations)."""
    data = _read_json(path, "Ground-truth")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ResultsFileError(
            f"Ground-truth file {path} is not a COCO annotation file (needs 'images' and 'annotations'; a "
            "results list goes to --pred)."
        )
    if not data["images"]:
        raise ResultsFileError(f"Ground-truth file {path} has no images.")
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not all(k in im for k in ("id", "height", "width")):
            raise ResultsFileError(f"{path}: images[{i}] needs 'id', 'height' and 'width' (got {im!r:.120}).")
    data.setdefault("categories", [])
    img_ids = {im["id"] for im in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    for i, a in enumerate(data["annotations"]):
        for key in ("id", "image_id", "category_id"):
            if key not in a:
                raise ResultsFileError(f"{path}: annotations[{i}] has no '{key}'.")
        if a["image_id"] not in img_ids:
            raise ResultsFileError(f"{path}: annotations[{i}] refers to unknown image id {a['image_id']}.")
        if a["category_id"] not in cat_ids:
            raise ResultsFileError(f"{path}: annotations[{i}] has unknown category id {a['category_id']}.")
    return GroundTruthSet.from_coco(data)


def _check_rle(seg, h: int, w: int) -> dict:
    """A results ``segmentation`` -> compressed RLE at (h, w); ValueError with the reason otherwise."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
            raise ValueError("polygons must be lists of at least 3 (x, y) points")
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise ValueError("segmentation must be an RLE dict with 'size' and 'counts', or polygons")
    size = list(seg["size"])
    if size != [h, w]:
        raise ValueError(f"RLE size {size} differs from the image size [{h}, {w}]")
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in counts):
            raise ValueError("uncompressed RLE 'counts' must be a list of integers")
        runs = np.asarray(counts, dtype=np.int64)
    elif isinstance(counts, (str, bytes)):
        counts = counts.decode("ascii", errors="replace") if isinstance(counts, bytes) else counts
        runs = decode_counts(counts)
    else:
        raise ValueError("RLE 'counts' must be a string or a list of run lengths")
    if (runs < 0).any() or int(runs.sum()) != h * w:
        raise ValueError(
            f"RLE runs must be non-negative and add up to h*w = {h * w} (they add up to {int(runs.sum())})"
        )
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"counts": counts, "size": [h, w]}, h, w)
    return {"size": [h, w], "counts": counts.encode("ascii")}


def load_results(path: str | Path, gt: GroundTruthSet) -> DetectionSet:
    """A COCO results file (list of detections) -> :class:`DetectionSet`, every entry checked.

    Each entry needs ``image_id`` and ``category_id`` known to ``gt``, a finite ``score``, and ``bbox``
    ``[x, y, w, h]`` and/or ``segmentation`` (RLE or polygons at the image size). Masks without boxes (or
    with ``"bbox": []``) get the mask's bounding box. Either all entries have masks or none do.

    Areas follow pycocotools' ``loadRes``: box areas for every iouType when the first entry has a non-empty
    ``bbox``, mask areas otherwise (``DetectionSet.area_rule``, see ``coco_sets``).
    """
    from pycocotools import mask as mask_utils

    data = _read_json(path, "Results")
    if isinstance(data, dict) and "annotations" in data:
        raise ResultsFileError(f"{path} looks like a ground-truth file; --pred takes a COCO results list.")
    if not isinstance(data, list):
        raise ResultsFileError(f"Results file {path} must hold a JSON list of detections.")
    if not data:
        raise ResultsFileError(f"Results file {path} holds no detections.")
    n = len(data)
    img = np.zeros(n, np.int64)
    cat = np.zeros(n, np.int64)
    score = np.zeros(n, np.float64)
    bbox = np.zeros((n, 4), np.float64)
    with_masks = "segmentation" in data[0] if isinstance(data[0], dict) else False
    # pycocotools' loadRes: a non-empty bbox in the first result means box areas for all (coco_sets doc)
    box_areas = isinstance(data[0], dict) and data[0].get("bbox", []) != []
    rles: list[dict] = []
    for i, d in enumerate(data):

        def bad(why, i=i, d=d):
            return ResultsFileError(f"{path}: entry {i} ({json.dumps(d)[:160]}): {why}")

        if not isinstance(d, dict):
            raise bad("each detection must be a JSON object")
        if d.get("image_id") not in gt.image_sizes:
            raise bad(f"image id {d.get('image_id')!r} is not in the ground truth")
        if d.get("category_id") not in gt.categories:
            raise bad(f"category id {d.get('category_id')!r} is not in the ground truth's categories")
        s = d.get("score")
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
            raise bad("'score' must be a finite number")
        if ("segmentation" in d) != with_masks:
            raise bad("either every detection has a 'segmentation' or none does")
        has_box = "bbox" in d and not (with_masks and d["bbox"] == [])
        if not has_box and not with_masks:
            raise bad("a detection needs a 'bbox' or a 'segmentation'")
        h, w = gt.image_sizes[d["image_id"]]
        if with_masks:
            try:
                rles.append(_check_rle(d["segmentation"], h, w))
            except ValueError as exc:
                raise bad(f"bad segmentation: {exc}") from None
        if has_box:
            b = d["bbox"]
            if (
                not isinstance(b, list)
                or len(b) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in b)
                or b[2] < 0
                or b[3] < 0
            ):
                raise bad("'bbox' must be [x, y, width, height] with finite numbers and width, height >= 0")
            bbox[i] = b
        else:
            bbox[i] = mask_utils.toBbox(rles[-1])
        img[i], cat[i], score[i] = d["image_id"], d["category_id"], s
    return DetectionSet(
        img,
        cat,
        score,
        bbox,
        rles if with_masks else None,
        rle_area(rles) if with_masks else None,
        area_rule="box" if box_areas else "mask",
    )
