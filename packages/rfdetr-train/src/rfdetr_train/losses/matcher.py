"""Hungarian matching of predictions to ground truth, for every output layer and DETR group at once.

Cost of assigning query q to object t (DETR, Carion et al., ECCV 2020, arXiv 2005.12872; weights and terms as
upstream RF-DETR): ``5 * L1(box) + 2 * focal class cost + 2 * (-GIoU)`` plus, for segmentation,
``5 * mask BCE + 5 * mask Dice`` on uniform points shared by the batch. Group DETR (Chen et al., ICCV 2023,
arXiv 2207.13085): the ``G*Q`` queries are ``G`` independent groups of ``Q`` and every object is matched once in
each group.

Speed: cost matrices are built batched on the outputs' device (targets padded to the largest image), all
layers' matrices leave the device in ONE transfer (the step's only host sync), then SciPy's
``linear_sum_assignment`` solves each (layer, image, group) problem on the host, and all indices go back to
the device in one non-blocking copy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_train.losses import mask_entries
from rfdetr_train.losses.box_ops import box_cxcywh_to_xyxy, pairwise_generalized_box_iou
from rfdetr_train.losses.coefficients import MatchCosts
from rfdetr_train.losses.point_sampling import (
    MatchPointSampler,
    UniformPointSampler,
    match_num_points,
    sample_points,
)
from rfdetr_train.losses.targets import LayerMatches, TargetBatch, TargetFormatError


class HungarianMatcher:
    """One-to-one assignment of queries to objects per (layer, image, group).

    Args:
        costs: weights of the cost terms (default :class:`MatchCosts`, upstream's); the mask terms are used
            when the outputs carry masks.
        focal_alpha: focal alpha of the class cost.
        focal_gamma: focal gamma of the class cost.
        mask_point_sample_ratio: the mask costs use ``h*w // ratio`` points (h, w: prediction mask size).
        match_point_sampler: ``(num_points, device) -> [num_points, 2]`` points in [0, 1]; called once per
            layer; default uniform from torch's global RNG.
    """

    def __init__(
        self,
        costs: MatchCosts | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        mask_point_sample_ratio: int = 16,
        match_point_sampler: MatchPointSampler | None = None,
    ) -> None:
        self.costs = costs if costs is not None else MatchCosts()
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.mask_point_sample_ratio = mask_point_sample_ratio
        self.match_point_sampler = match_point_sampler or UniformPointSampler()
        # Bound of the [l*B, GQ, P] float32 point logits of one batch of layers (see _mask_costs); a seg-medium
        # layer at batch 8 is 61 MB, so there the layers go one at a time.
        self.mask_cost_chunk_bytes = 64 << 20

    # -- costs ------------------------------------------------------------------------------------------

    def _class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Focal cost at each object's class: ``[B, GQ, K]`` logits, ``[B, T]`` labels -> ``[B, GQ, T]``."""
        x = logits.gather(2, labels.unsqueeze(1).expand(-1, logits.shape[1], -1))  # [B, GQ, T]
        p = x.sigmoid()
        # -log(p) = softplus(-x), -log(1-p) = softplus(x): stable for large |x|.
        positive = self.focal_alpha * (1 - p).pow(self.focal_gamma) * F.softplus(-x)
        negative = (1 - self.focal_alpha) * p.pow(self.focal_gamma) * F.softplus(x)
        return positive - negative

    def _mask_point_logits(self, pred_masks: Sequence[Any], points: Tensor) -> Tensor:
        """Prediction logits at each layer's shared points: ``L`` lazy entries or dense ``[B, GQ, h, w]`` and
        ``[L, P, 2]`` points -> ``[L*B, GQ, P]`` float32 (layer after layer).

        Each layer's map is sampled on its own, so at most one layer's float32 copy of its map exists at a time.
        """
        batch = mask_entries.reference(pred_masks[0]).shape[0]
        grids = points.unsqueeze(1).expand(-1, batch, -1, -1)  # [L, P, 2] -> [L, B, P, 2]
        if isinstance(pred_masks[0], Tensor):
            return torch.cat([sample_points(m.float(), g) for m, g in zip(pred_masks, grids)])  # [L*B, GQ, P]
        # Bilinear sampling is linear (and its weights sum to 1 with border padding), so sampling the features
        # then projecting equals projecting then sampling, at C*P instead of GQ*h*w work.
        feats = torch.cat(
            [sample_points(m["spatial_features"].float(), g) for m, g in zip(pred_masks, grids)]
        )  # [L*B, C, P]
        query = torch.cat([m["query_features"] for m in pred_masks]).float()  # [L*B, GQ, C]
        bias = torch.cat([mask_entries.query_bias(m) for m in pred_masks]).float()  # [L*B, GQ]
        return torch.bmm(query, feats) + bias.unsqueeze(2)  # [L*B, GQ, P]

    def _mask_costs(self, pred_masks: Sequence[Any], batch: TargetBatch) -> tuple[Tensor, Tensor]:
        """Pairwise mean BCE and Dice costs of ``L`` same-shaped layers on uniform points: -> two ``[L, B, GQ, Tmax]``.

        Each layer draws its own points (one sampler call per layer, in layer order); the costs then run as
        batches of ``l*B`` problems, ``l`` layers at a time, with ``l`` as large as keeps the ``[l*B, GQ, P]``
        float32 point logits within :attr:`mask_cost_chunk_bytes`: the matcher runs while the forward's
        activations are all alive, so its transients add to the step's peak memory.
        """
        ref = mask_entries.reference(pred_masks[0])
        height, width = ref.shape[-2:]
        count = match_num_points(height, width, self.mask_point_sample_ratio)
        points = torch.stack(
            [
                self.match_point_sampler(count, ref.device)
                .to(device=ref.device, dtype=torch.float32)
                .reshape(-1, 2)
                for _ in pred_masks
            ]
        )  # [L, P, 2]
        num_layers, num_points = len(pred_masks), points.shape[1]
        bsz, tmax = ref.shape[0], batch.padded_labels.shape[1]
        objects = torch.arange(batch.total, device=ref.device).repeat(num_layers)  # [L*T]
        coords = points.repeat_interleave(batch.total, dim=0)  # [L*T, P, 2]
        gt = points.new_zeros(num_layers, bsz * tmax, num_points)  # padded objects keep all-zero rows
        gt[:, batch.padded_slot] = batch.sample_masks(objects, coords).view(
            num_layers, batch.total, num_points
        )
        gt = gt.view(num_layers * bsz, tmax, num_points)  # [L, B*Tmax, P] -> [L*B, Tmax, P]
        queries = mask_entries.query_count(pred_masks[0])
        step = max(1, self.mask_cost_chunk_bytes // (bsz * queries * num_points * 4))
        parts = [
            _pairwise_mask_costs(
                self._mask_point_logits(pred_masks[i : i + step], points[i : i + step]),
                gt[i * bsz : (i + step) * bsz],
            )
            for i in range(0, num_layers, step)
        ]
        shape = (num_layers, bsz, queries, tmax)  # [L*B, GQ, Tmax] -> [L, B, GQ, Tmax]
        return tuple(torch.cat([part[k] for part in parts]).view(shape) for k in (0, 1))

    @torch.no_grad()
    def cost_matrices(self, layers: Sequence[dict[str, Any]], batch: TargetBatch) -> Tensor:
        """Weighted matching costs of same-shaped layers, batched: -> ``[L, B, GQ, Tmax]`` float32.

        The class, box and GIoU terms of all layers are computed in one pass over ``L*B`` stacked problems
        (their inputs are small; what costs is the number of kernel launches, which then does not grow with
        the layer count); the mask terms per layer. Columns past an image's object count are padding;
        non-finite entries are left as they are (:meth:`match` replaces them).
        """
        logits = torch.stack([out["pred_logits"] for out in layers]).float()  # [L, B, GQ, K]
        boxes = torch.stack([out["pred_boxes"] for out in layers]).float()  # [L, B, GQ, 4]
        num_layers, bsz, gq, num_classes = logits.shape
        # Out-of-range labels are reported after the transfer in match(); clamp so the gather cannot fault.
        labels = batch.padded_labels.clamp(0, num_classes - 1).repeat(num_layers, 1)  # [L*B, Tmax]
        tgt_boxes = batch.padded_boxes.repeat(num_layers, 1, 1)  # [L*B, Tmax, 4]
        boxes = boxes.view(num_layers * bsz, gq, 4)
        cost_bbox = (boxes.unsqueeze(2) - tgt_boxes.unsqueeze(1)).abs().sum(-1)  # [L*B, GQ, Tmax]
        cost_class = self._class_cost(logits.view(num_layers * bsz, gq, num_classes), labels)
        cost_giou = -pairwise_generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        w = self.costs
        cost = w.bbox * cost_bbox + w.cls * cost_class + w.giou * cost_giou
        cost = cost.view(num_layers, bsz, gq, -1)  # [L*B, GQ, Tmax] -> [L, B, GQ, Tmax]
        if batch.masks is not None and w.uses_masks:
            if any("pred_masks" not in out for out in layers):
                raise TargetFormatError("segmentation matching needs 'pred_masks' in every output layer")
            masks = [out["pred_masks"] for out in layers]
            if len({mask_entries.signature(m) for m in masks}) == 1:  # one batched pass
                cost_ce, cost_dice = self._mask_costs(masks, batch)
            else:
                parts = [self._mask_costs([m], batch) for m in masks]
                cost_ce, cost_dice = (torch.cat([p[i] for p in parts]) for i in (0, 1))
            cost += w.mask_ce * cost_ce + w.mask_dice * cost_dice
        return cost

    def cost_matrix(self, outputs: dict[str, Any], batch: TargetBatch) -> Tensor:
        """Weighted matching cost of one layer: -> ``[B, GQ, Tmax]`` float32 on the outputs' device."""
        return self.cost_matrices([outputs], batch)[0]

    # -- assignment -------------------------------------------------------------------------------------

    @torch.no_grad()
    def match(
        self, layers: Sequence[dict[str, Any]], batch: TargetBatch, group_detr: int = 1
    ) -> list[LayerMatches]:
        """Match every layer's queries to the objects, each DETR group independently.

        Args:
            layers: output dicts (``pred_logits [B, G*Q, K]``, ``pred_boxes [B, G*Q, 4]`` normalised cxcywh,
                optional ``pred_masks``: lazy ``{"spatial_features", "query_features", "bias"}`` or dense
                ``[B, G*Q, h, w]``).
            batch: the packed targets.
            group_detr: number of query groups G.

        Returns:
            One :class:`LayerMatches` per layer (``min(Q, n_b)`` pairs per image and group).
        """
        if not layers:
            return []
        device = layers[0]["pred_logits"].device
        shapes = []
        for i, out in enumerate(layers):
            logits, boxes = out["pred_logits"], out["pred_boxes"]
            if logits.dim() != 3 or boxes.shape != (*logits.shape[:2], 4):
                raise TargetFormatError(
                    f"layer {i}: pred_logits must be [B, G*Q, K] and pred_boxes [B, G*Q, 4], got "
                    f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
                )
            if logits.shape[0] != len(batch.sizes):
                raise TargetFormatError(
                    f"layer {i}: batch of {logits.shape[0]} outputs but {len(batch.sizes)} targets"
                )
            if logits.shape[1] % group_detr:
                raise TargetFormatError(
                    f"layer {i}: {logits.shape[1]} queries do not split into group_detr={group_detr} groups"
                )
            shapes.append(tuple(logits.shape[:2]))
        if batch.total == 0:  # nothing to match: no cost, no transfer, no sync
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return [LayerMatches(empty, empty, empty, empty, (0,) * len(batch.sizes)) for _ in layers]

        tmax = batch.padded_labels.shape[1]
        if len({(tuple(out["pred_logits"].shape), out["pred_logits"].dtype) for out in layers}) == 1:
            flat = self.cost_matrices(layers, batch).reshape(-1)
        else:  # layers of different shapes cannot be stacked: one pass each
            flat = torch.cat([self.cost_matrix(out, batch).reshape(-1) for out in layers])
        # A NaN/inf cost (diverging outputs) would make the solver fail; replace it with a finite value above
        # every finite cost so such pairs are taken only when nothing else is left.
        finite = torch.isfinite(flat)
        sentinel = (flat.abs().masked_fill(~finite, 0).amax() * 2 + 1).clamp(max=1e30)
        flat = torch.where(finite, flat, sentinel)
        # Label range rides along with the costs: checked after the one transfer, no extra sync.
        label_range = torch.stack([batch.labels.min(), batch.labels.max()]).to(flat.dtype)
        host = _to_host(torch.cat([flat, label_range])).numpy()  # the step's single device -> host sync
        lo, hi = int(host[-2]), int(host[-1])
        for i, out in enumerate(layers):
            k = out["pred_logits"].shape[2]
            if lo < 0 or hi >= k:
                raise TargetFormatError(
                    f"target labels span [{lo}, {hi}] but layer {i} has {k} class slots; labels must be training "
                    f"ids in [0, {k - 1}] (check the dataset's class map and the model's num_classes)"
                )

        # One (layer, image, group) problem per entry: [Q, n_b] cost views into the host buffer.
        problems, keys, counts_per_layer, start = [], [], [], 0
        for bsz, gq in shapes:
            cost = host[start : start + bsz * gq * tmax].reshape(bsz, gq, tmax)
            start += bsz * gq * tmax
            q = gq // group_detr
            counts = []
            for b, n in enumerate(batch.sizes):
                for g in range(group_detr if n else 0):
                    problems.append(cost[b, g * q : (g + 1) * q, :n])
                    keys.append((b, g * q))
                counts.append(group_detr * min(q, n))
            counts_per_layer.append(tuple(counts))
        solved = _solve_all(problems)
        # One set of array ops for all problems (a stack per problem cost ~10 us each, 624 problems at seg-medium
        # batch 8: host time after the sync, while the GPU waits for the losses).
        rows = np.concatenate([r for r, _ in solved]).astype(np.int64)  # [sum of pairs]
        cols = np.concatenate([c for _, c in solved]).astype(np.int64)
        lengths = [len(r) for r, _ in solved]
        image = np.repeat(np.array([b for b, _ in keys], dtype=np.int64), lengths)
        query_offset = np.repeat(np.array([q for _, q in keys], dtype=np.int64), lengths)
        offsets = np.asarray(batch.offsets, dtype=np.int64)
        # rows: image, query over all groups, object in its image, object in the batch
        index = torch.from_numpy(np.stack([image, rows + query_offset, cols, cols + offsets[image]]))  # [4, pairs]
        if device.type == "cuda":
            index = index.pin_memory().to(device, non_blocking=True)
        else:
            index = index.to(device)
        result, start = [], 0
        for counts in counts_per_layer:
            m = sum(counts)
            part = index[:, start : start + m]
            start += m
            result.append(LayerMatches(part[0], part[1], part[2], part[3], counts))
        return result

    def __call__(
        self, layers: Sequence[dict[str, Any]], batch: TargetBatch, group_detr: int = 1
    ) -> list[LayerMatches]:
        return self.match(layers, batch, group_detr)


def _pairwise_mask_costs(x: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """Mean point BCE and Dice of every (query, object) pair: ``[N, GQ, P]`` logits, ``[N, Tmax, P]`` 0/1 ground
    truth -> two ``[N, GQ, Tmax]``."""
    num_points = x.shape[2]
    # BCE(x, 0) = softplus(x) and BCE(x, 1) = softplus(x) - x, so the sum over points is
    # rowsum(softplus(x)) - x . t: one elementwise pass and one product.
    bce = (F.softplus(x).sum(-1).unsqueeze(2) - torch.bmm(x, gt.transpose(1, 2))) / num_points
    prob = x.sigmoid()
    overlap = 2 * torch.bmm(prob, gt.transpose(1, 2))  # [N, GQ, Tmax]
    total = prob.sum(-1).unsqueeze(2) + gt.sum(-1).unsqueeze(1)
    return bce, 1 - (overlap + 1) / (total + 1)


def _to_host(values: Tensor) -> Tensor:
    """Device -> host copy; from CUDA through pinned memory (faster than a pageable copy), one stream sync."""
    if values.device.type != "cuda":
        return values.cpu()
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    torch.cuda.current_stream(values.device).synchronize()
    return host


# SciPy's solver releases the GIL, so problems solve in parallel threads. Below this many problems the thread
# hand-off costs more than it saves.
_MIN_PROBLEMS_FOR_THREADS = 32
_MAX_SOLVER_THREADS = 8
_solver_pool = None


def _solver_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(_MAX_SOLVER_THREADS, cpus // 2))


def _solve_all(problems: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``linear_sum_assignment`` of every cost matrix, in order (rows sorted ascending in each result)."""
    from scipy.optimize import linear_sum_assignment

    global _solver_pool
    threads = _solver_threads()
    if threads < 2 or len(problems) < _MIN_PROBLEMS_FOR_THREADS:
        return [linear_sum_assignment(p) for p in problems]
    if _solver_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _solver_pool = ThreadPoolExecutor(threads, thread_name_prefix="rfdetr-lsa")
    chunk = -(-len(problems) // threads)  # ceil: one batch of problems per thread
    parts = [problems[i : i + chunk] for i in range(0, len(problems), chunk)]
    solved = _solver_pool.map(lambda part: [linear_sum_assignment(p) for p in part], parts)
    return [result for part in solved for result in part]
