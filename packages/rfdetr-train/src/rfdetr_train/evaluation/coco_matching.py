"""Vectorised COCO evaluation (the ``fast`` backend): same numbers as pycocotools' ``COCOeval``.

pycocotools runs a Python triple loop (thresholds x detections x ground truths) for every image x category x
area range, and a Python loop per recall step. Here the greedy matching runs once per detection *rank*
over all (image, category, area range) problems at once, with NumPy over thresholds and ground truths, and
the accumulation uses a reversed cumulative max. IoUs still come from ``pycocotools.mask.iou`` (C), so
every IoU is bit-identical and matching decisions cannot differ.

Matching rule reproduced (pycocotools ``evaluateImg``): detections in descending score order (stable);
each takes, among still-free non-ignored ground truths with IoU >= t, the one with the highest IoU (the last
one on ties); only if there is none, an ignored one (crowd regions may be matched many times). Ignored
ground truths are crowd regions and objects outside the area range; unmatched detections outside the area
range are ignored. One deliberate difference: pycocotools stores the matched ground-truth *id* and tests it
for truth, so a ground truth with annotation id 0 counts as unmatched there; here it is matched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rfdetr_train.evaluation.coco_sets import DetectionSet, GroundTruthSet

# COCO defaults (pycocotools Params.setDetParams).
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RNGS = np.array([[0**2, 1e5**2], [0**2, 32**2], [32**2, 96**2], [96**2, 1e5**2]], dtype=np.float64)
AREA_LABELS = ("all", "small", "medium", "large")


def coco_max_dets(max_dets: int) -> list[int]:
    """COCO ``maxDets`` for a limit of ``max_dets`` detections per image: ``[1, 10, N]`` (sorted)."""
    return sorted([1, min(10, max_dets), max_dets])


@dataclass
class MatchTable:
    """Matches at IoU 0.5, area "all", after the per-image limit: what per-class tables and curves need.

    Attributes:
        det_index: ``[n]`` rows of the :class:`DetectionSet` that were evaluated (top ``maxDets[-1]`` per
            image and category).
        cat_index: ``[n]`` index into ``cat_ids``; score ``[n]``; image_index ``[n]`` into ``img_ids``.
        matched_gt: ``[n]`` row of the :class:`GroundTruthSet` matched at IoU 0.5, or -1.
        ignored: ``[n]`` bool, detection ignored (matched to a crowd region).
        num_gt: ``[K]`` non-crowd ground truths per category (pycocotools' ``npig`` at area "all").
    """

    det_index: np.ndarray
    cat_index: np.ndarray
    image_index: np.ndarray
    score: np.ndarray
    matched_gt: np.ndarray
    ignored: np.ndarray
    num_gt: np.ndarray


@dataclass
class CocoResult:
    """Output of one COCO evaluation (shapes as pycocotools' ``COCOeval.eval``).

    Attributes:
        precision: ``[T, R, K, A, M]`` (-1 where a category has no ground truth); scores the same shape.
        recall: ``[T, K, A, M]``.
        stats: the 12 summary numbers of ``COCOeval.summarize``.
    """

    iou_type: str
    img_ids: np.ndarray
    cat_ids: np.ndarray
    max_dets: list[int]
    precision: np.ndarray
    recall: np.ndarray
    scores: np.ndarray
    stats: np.ndarray
    matches: MatchTable


def group_blocks(image_idx: np.ndarray, cat_idx: np.ndarray, num_cats: int, order: np.ndarray):
    """Split rows (already sorted by ``order``) into (image, category) blocks: dict key -> row array."""
    key = image_idx[order] * num_cats + cat_idx[order]  # [N], blocks contiguous after sorting
    if key.size == 0:
        return {}
    cuts = np.flatnonzero(np.diff(key)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [key.size]])
    return {int(key[s]): order[s:e] for s, e in zip(starts, ends, strict=True)}


def evaluate_coco(
    gt: GroundTruthSet,
    dt: DetectionSet,
    iou_type: str,
    img_ids,
    cat_ids=None,
    max_dets: int = 100,
    boundary_rles: tuple[list, list] | None = None,
) -> CocoResult:
    """COCO evaluation of ``dt`` against ``gt`` on ``img_ids`` (pycocotools semantics, see module doc).

    Args:
        iou_type: ``"bbox"`` or ``"segm"``; with ``boundary_rles = (gt_boundaries, dt_boundaries)`` a segm
            pair's IoU is ``min(mask IoU, boundary IoU)`` (Boundary AP, Cheng et al. CVPR 2021).
        img_ids: evaluated images (others are ignored, as pycocotools' ``params.imgIds``).
        cat_ids: evaluated categories (default: all ground-truth categories).
        max_dets: the per-image limit ``N``; ``maxDets = [1, 10, N]``.
    """
    from pycocotools import mask as mask_utils

    img_ids = np.unique(np.asarray(list(img_ids), dtype=np.int64))
    cat_ids = np.unique(
        np.asarray(sorted(gt.categories) if cat_ids is None else list(cat_ids), dtype=np.int64)
    )
    mdets = coco_max_dets(max_dets)
    top = mdets[-1]
    num_k, num_a, num_t = len(cat_ids), len(AREA_RNGS), len(IOU_THRS)

    # Map ids to positions; rows outside the evaluated images/categories are dropped (pycocotools does too).
    def positions(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(table, ids)
        pos = np.minimum(pos, max(len(table) - 1, 0))
        ok = (table[pos] == ids) if len(table) else np.zeros(ids.shape, bool)
        return np.where(ok, pos, -1)

    g_img, g_cat = positions(gt.image_id, img_ids), positions(gt.category_id, cat_ids)
    d_img, d_cat = positions(dt.image_id, img_ids), positions(dt.category_id, cat_ids)
    g_rows = np.flatnonzero((g_img >= 0) & (g_cat >= 0))
    d_rows = np.flatnonzero((d_img >= 0) & (d_cat >= 0))
    # Ground truths in annotation order per block; detections by descending score, stable (mergesort).
    g_order = g_rows[np.lexsort((g_rows, g_cat[g_rows], g_img[g_rows]))]
    d_order = d_rows[np.lexsort((-dt.score[d_rows], d_cat[d_rows], d_img[d_rows]))]
    g_blocks = group_blocks(g_img, g_cat, num_k, g_order)
    d_blocks = {k: v[:top] for k, v in group_blocks(d_img, d_cat, num_k, d_order).items()}

    d_area = dt.area(iou_type)
    if iou_type == "segm":
        g_geo, d_geo = gt.ensure_rles(), dt.rles
    else:
        g_geo, d_geo = gt.bbox, dt.bbox

    # --- IoUs per block, then the greedy matching for all blocks and area ranges at once -----------------
    ious = {}
    for key, drows in d_blocks.items():
        grows = g_blocks.get(key)
        if grows is None:
            continue
        crowd = gt.iscrowd[grows].astype(np.uint8).tolist()
        if iou_type == "segm":
            iou = np.asarray(mask_utils.iou([d_geo[i] for i in drows], [g_geo[i] for i in grows], crowd))
            if boundary_rles is not None:
                gb, db = boundary_rles
                biou = np.asarray(mask_utils.iou([db[i] for i in drows], [gb[i] for i in grows], crowd))
                iou = np.minimum(iou, biou)
        else:
            iou = np.asarray(mask_utils.iou(d_geo[drows], g_geo[grows], crowd))
        ious[key] = iou.reshape(len(drows), len(grows))

    g_ignore_area = (gt.area[None, :] < AREA_RNGS[:, :1]) | (gt.area[None, :] > AREA_RNGS[:, 1:])  # [A, G]
    g_ignore = g_ignore_area | gt.iscrowd[None, :]
    d_out = (d_area[None, :] < AREA_RNGS[:, :1]) | (d_area[None, :] > AREA_RNGS[:, 1:])  # [A, D]
    # Per detection row: matched gt row at each (area, threshold), -1 if none.
    match = np.full((num_a, num_t, len(dt)), -1, dtype=np.int32 if len(gt.ann_id) < 2**31 else np.int64)
    _match_all(ious, d_blocks, g_blocks, gt.iscrowd, g_ignore, match)

    # --- accumulate (pycocotools accumulate, vectorised over area ranges and thresholds) -----------------
    num_r, num_m = len(REC_THRS), len(mdets)
    precision = -np.ones((num_t, num_r, num_k, num_a, num_m))
    recall = -np.ones((num_t, num_k, num_a, num_m))
    scores = -np.ones((num_t, num_r, num_k, num_a, num_m))

    kept = np.concatenate(list(d_blocks.values())) if d_blocks else np.zeros(0, np.int64)
    kept = kept[np.lexsort((np.arange(kept.size), d_img[kept]))]  # image order, then rank (concat order)
    rank = np.zeros(len(dt), dtype=np.int64)
    for rows in d_blocks.values():
        rank[rows] = np.arange(rows.size)
    matched = match >= 0  # [A, T, D]
    if g_ignore.shape[1]:
        safe = np.maximum(match, 0)
        d_ignored = np.where(matched, g_ignore[np.arange(num_a)[:, None, None], safe], d_out[:, None, :])
    else:  # no ground truth at all (a split of negative images): nothing is matched, every stat is -1
        d_ignored = np.broadcast_to(d_out[:, None, :], matched.shape)
    npig = np.zeros((num_k, num_a), dtype=np.int64)
    if g_rows.size:
        np.add.at(npig, g_cat[g_rows], (~g_ignore[:, g_rows]).T.astype(np.int64))
    kept_by_cat = [kept[d_cat[kept] == k] for k in range(num_k)]
    eps = np.spacing(1)
    for k in range(num_k):
        rows_k = kept_by_cat[k]
        for m, md in enumerate(mdets):
            sub = rows_k[rank[rows_k] < md]
            order = np.argsort(-dt.score[sub], kind="mergesort")
            sub = sub[order]
            s_sorted = dt.score[sub]
            nd = sub.size
            tps = matched[:, :, sub] & ~d_ignored[:, :, sub]  # [A, T, nd]
            fps = ~matched[:, :, sub] & ~d_ignored[:, :, sub]
            tp_sum = np.cumsum(tps, axis=2).astype(float)
            fp_sum = np.cumsum(fps, axis=2).astype(float)
            for a in range(num_a):
                n_pos = npig[k, a]
                if n_pos == 0:
                    continue
                rc = tp_sum[a] / n_pos  # [T, nd]
                pr = tp_sum[a] / (fp_sum[a] + tp_sum[a] + eps)
                # precision envelope: pr[i] = max(pr[i:]) (pycocotools' backwards loop)
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
                recall[:, k, a, m] = rc[:, -1] if nd else 0.0
                for t in range(num_t):
                    inds = np.searchsorted(rc[t], REC_THRS, side="left")
                    valid = inds < nd
                    q = np.zeros(num_r)
                    ss = np.zeros(num_r)
                    q[valid] = pr[t, inds[valid]]
                    ss[valid] = s_sorted[inds[valid]]  # inds is sorted: the valid ones are a prefix
                    precision[t, :, k, a, m] = q
                    scores[t, :, k, a, m] = ss

    stats = summarize(precision, recall, mdets)
    last = kept[rank[kept] < top]
    matches = MatchTable(
        det_index=last,
        cat_index=d_cat[last],
        image_index=d_img[last],
        score=dt.score[last],
        matched_gt=match[0, 0, last],
        ignored=d_ignored[0, 0, last],
        num_gt=npig[:, 0],
    )
    return CocoResult(iou_type, img_ids, cat_ids, mdets, precision, recall, scores, stats, matches)


def _match_all(ious, d_blocks, g_blocks, iscrowd, g_ignore, match) -> None:
    """Greedy matching of every block with both detections and ground truths; fills ``match [A,T,D]``.

    Blocks are bucketed by ground-truth count (padded to a power of two) and ordered by detection count,
    so step ``r`` works on the prefix of blocks that have an ``r``-th detection: arrays ``[A, n, T, G]``.
    """
    keys = list(ious)
    if not keys:
        return
    ng = np.array([ious[k].shape[1] for k in keys])
    buckets = np.ceil(np.log2(np.maximum(ng, 1))).astype(int)
    for b in np.unique(buckets):
        sel = [keys[i] for i in np.flatnonzero(buckets == b)]
        sel.sort(key=lambda k: -ious[k].shape[0])
        # groups of blocks with similar detection counts, so padding to the group's largest stays small
        for s0 in range(0, len(sel), MATCH_GROUP):
            _match_group(
                sel[s0 : s0 + MATCH_GROUP], 1 << int(b), ious, d_blocks, g_blocks, iscrowd, g_ignore, match
            )


MATCH_GROUP = 1024  # blocks matched together (bounds the padded [A, n, T, G] arrays)


def _match_group(sel, gp, ious, d_blocks, g_blocks, iscrowd, g_ignore, match) -> None:
    """Match the blocks ``sel`` (sorted by detection count, at most ``gp`` ground truths each) at once."""
    num_a, num_t = g_ignore.shape[0], len(IOU_THRS)
    n_blk = len(sel)
    nd = np.array([ious[k].shape[0] for k in sel])
    dmax = int(nd[0])
    iou = np.full((n_blk, dmax, gp), -1.0)  # -1: padding, never >= a threshold
    crowd = np.zeros((n_blk, gp), dtype=bool)
    ign = np.ones((num_a, n_blk, gp), dtype=bool)
    grow = np.zeros((n_blk, gp), dtype=np.int64)
    for i, k in enumerate(sel):
        g = g_blocks[k]
        iou[i, : nd[i], : g.size] = ious[k]
        crowd[i, : g.size] = iscrowd[g]
        ign[:, i, : g.size] = g_ignore[:, g]
        grow[i, : g.size] = g
    taken = np.zeros((num_a, n_blk, num_t, gp), dtype=bool)
    out = np.full((num_a, n_blk, num_t, dmax), -1, dtype=match.dtype)
    thr = IOU_THRS[None, None, :, None]
    for r in range(dmax):
        n = int(np.count_nonzero(nd > r))  # blocks are sorted by nd, so active ones are a prefix
        row = iou[:n, r, :][None, :, None, :]  # [1, n, 1, G]
        cand = (row >= thr) & (~taken[:, :n] | crowd[None, :n, None, :])  # [A, n, T, G]
        ig = ign[:, :n, None, :]
        pick = np.full(cand.shape[:3], -1, dtype=np.int64)
        for group in (cand & ~ig, cand & ig):  # non-ignored first, ignored only if none
            vals = np.where(group, row, -np.inf)
            best = vals.max(axis=3, keepdims=True)
            hit = group & (vals == best)
            last = gp - 1 - np.argmax(hit[..., ::-1], axis=3)  # last index with the best IoU
            found = hit.any(axis=3) & (pick < 0)
            pick[found] = last[found]
        a_i, n_i, t_i = np.nonzero(pick >= 0)
        taken[a_i, n_i, t_i, pick[a_i, n_i, t_i]] = True
        out[a_i, n_i, t_i, r] = grow[n_i, pick[a_i, n_i, t_i]]
    for i, k in enumerate(sel):
        match[:, :, d_blocks[k]] = out[:, i, :, : nd[i]]


def summarize(precision: np.ndarray, recall: np.ndarray, max_dets: list[int]) -> np.ndarray:
    """The 12 numbers of ``COCOeval.summarize`` (mean over entries > -1, or -1 when there are none)."""

    def mean(s):
        s = s[s > -1]
        return float(np.mean(s)) if s.size else -1.0

    def ap(iou=None, area=0, md=max_dets[-1]):
        s = precision[:, :, :, area, max_dets.index(md)]
        if iou is not None:
            s = s[np.where(iou == IOU_THRS)[0]]
        return mean(s)

    def ar(area=0, md=max_dets[-1]):
        return mean(recall[:, :, area, max_dets.index(md)])

    return np.array(
        [
            ap(),
            ap(iou=0.5),
            ap(iou=0.75),
            ap(area=1),
            ap(area=2),
            ap(area=3),
            ar(md=max_dets[0]),
            ar(md=max_dets[1]),
            ar(),
            ar(area=1),
            ar(area=2),
            ar(area=3),
        ]
    )


STAT_KEYS_AP = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def stats_to_dict(stats: np.ndarray, max_dets: list[int]) -> dict[str, float]:
    """The nested-metrics section of DESIGN: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR{N}, ARs, ARm, ARl."""
    keys = [*STAT_KEYS_AP, *(f"AR{m}" for m in max_dets), "ARs", "ARm", "ARl"]
    out: dict[str, float] = {}
    for k, v in zip(keys, stats, strict=True):
        out.setdefault(k, float(v))
    return out
