"""The ``pycocotools`` backend: the reference that the fast backend must equal (tests gate it).

Runs ``COCOeval`` on the same :class:`GroundTruthSet` / :class:`DetectionSet` and returns the same
:class:`CocoResult`. Boundary AP replaces ``COCOeval.computeIoU`` by ``min(mask IoU, boundary IoU)``, the
definition of Cheng et al. (CVPR 2021) and of their boundary-iou-api.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

from rfdetr_core.mask_rle import rle_area
from rfdetr_train.evaluation.coco_matching import CocoResult, MatchTable, coco_max_dets
from rfdetr_train.evaluation.coco_sets import DetectionSet, GroundTruthSet


def evaluate_coco_reference(
    gt: GroundTruthSet,
    dt: DetectionSet,
    iou_type: str,
    img_ids,
    cat_ids=None,
    max_dets: int = 100,
    boundary_rles: tuple[list, list] | None = None,
) -> CocoResult:
    """Same contract as :func:`~rfdetr_train.evaluation.coco_matching.evaluate_coco`, through pycocotools."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = gt.coco
    # Results in row order: loadRes numbers them 1..D, so detection id i+1 is row i.
    results = dt.to_coco_results(iou_type)
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    areas = dt.area(iou_type)
    for i, r in enumerate(results):
        r["id"] = i + 1
        r["iscrowd"] = 0
        r["area"] = float(areas[i])
        if iou_type != "segm":
            x, y, w, h = r["bbox"]
            r.setdefault("segmentation", [[x, y, x, y + h, x + w, y + h, x + w, y]])
        coco_dt.dataset["annotations"].append(r)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()

    cls = COCOeval
    if boundary_rles is not None:
        g_bound, d_bound = boundary_rles
        g_row = {int(a): i for i, a in enumerate(gt.ann_id)}

        class BoundaryCOCOeval(COCOeval):
            def computeIoU(self, img_id, cat_id):
                gts, dts = self._gts[img_id, cat_id], self._dts[img_id, cat_id]
                if not gts and not dts:
                    return []
                order = np.argsort([-d["score"] for d in dts], kind="mergesort")
                dts = [dts[i] for i in order][: self.params.maxDets[-1]]
                crowd = [int(g["iscrowd"]) for g in gts]
                miou = mask_utils.iou(
                    [d["segmentation"] for d in dts], [g["segmentation"] for g in gts], crowd
                )
                biou = mask_utils.iou(
                    [d_bound[d["id"] - 1] for d in dts], [g_bound[g_row[g["id"]]] for g in gts], crowd
                )
                return np.minimum(miou, biou) if len(miou) else miou

        cls = BoundaryCOCOeval

    ev = cls(coco_gt, coco_dt, iouType=iou_type)
    ev.params.imgIds = sorted(int(i) for i in img_ids)
    if cat_ids is not None:
        ev.params.catIds = sorted(int(c) for c in cat_ids)
    mdets = coco_max_dets(max_dets)
    ev.params.maxDets = mdets
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    cat_list = np.asarray(ev.params.catIds, dtype=np.int64)
    img_list = np.asarray(ev.params.imgIds, dtype=np.int64)
    return CocoResult(
        iou_type=iou_type,
        img_ids=img_list,
        cat_ids=cat_list,
        max_dets=mdets,
        precision=ev.eval["precision"],
        recall=ev.eval["recall"],
        scores=ev.eval["scores"],
        stats=np.asarray(ev.stats, dtype=np.float64),
        matches=_match_table(ev, gt, cat_list, img_list),
    )


def _match_table(ev, gt: GroundTruthSet, cat_ids: np.ndarray, img_ids: np.ndarray) -> MatchTable:
    """Matches at IoU 0.5 / area "all" read back from ``COCOeval.evalImgs``."""
    g_row = {int(a): i for i, a in enumerate(gt.ann_id)}
    n_img = len(img_ids)
    det, cat, img, score, mgt, ign = [], [], [], [], [], []
    num_gt = np.zeros(len(cat_ids), dtype=np.int64)
    for k in range(len(cat_ids)):
        for i in range(n_img):
            e = ev.evalImgs[k * len(ev.params.areaRng) * n_img + i]  # area index 0 = "all"
            if e is None:
                continue
            num_gt[k] += int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            for j, d_id in enumerate(e["dtIds"]):
                det.append(d_id - 1)
                cat.append(k)
                img.append(i)
                score.append(e["dtScores"][j])
                g_id = int(e["dtMatches"][0, j])
                mgt.append(g_row[g_id] if g_id > 0 else -1)
                ign.append(bool(e["dtIgnore"][0, j]))
    return MatchTable(
        det_index=np.asarray(det, dtype=np.int64),
        cat_index=np.asarray(cat, dtype=np.int64),
        image_index=np.asarray(img, dtype=np.int64),
        score=np.asarray(score, dtype=np.float64),
        matched_gt=np.asarray(mgt, dtype=np.int64),
        ignored=np.asarray(ign, dtype=bool),
        num_gt=num_gt,
    )


def logits_to_rle_naive(
    logits: torch.Tensor, out_size: tuple[int, int], threshold: float = 0.0, chunk: int = 32
) -> tuple[list[dict], np.ndarray]:
    """The straightforward path (upstream's) through pycocotools: upsample every mask to full size, threshold,
    encode.

    ``[N, h, w]`` logits -> N RLEs and ``[N]`` areas. The reference of :func:`rfdetr_core.mask_rle.logits_to_rle`
    in tests and the speed benchmark.
    """
    import torch.nn.functional as F
    from pycocotools import mask as mask_utils

    rles: list[dict] = []
    for s in range(0, logits.shape[0], chunk):
        up = F.interpolate(logits[s : s + chunk, None].float(), size=tuple(out_size), mode="bilinear")
        m = (up[:, 0] > threshold).cpu().numpy()  # [c, H, W]
        rles.extend(mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8))))
    return rles, rle_area(rles)
