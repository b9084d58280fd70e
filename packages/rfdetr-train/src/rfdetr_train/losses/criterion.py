"""The training criterion of RF-DETR-Seg: IoU-aware BCE classes, L1 + GIoU boxes, point-sampled mask BCE + Dice.

Every output layer is matched and supervised on its own: the final decoder layer (no suffix), each earlier
decoder layer (``aux_outputs`` -> ``_0`` ... ``_{L-2}``) and the two-stage encoder proposals (``enc_outputs`` ->
``_enc``). When every layer has the same shapes (the model's training output), the losses of all layers are
computed in one batched pass (:mod:`rfdetr_train.losses.layer_batch`): the same sums, a fraction of the kernel
launches and autograd nodes; otherwise layer by layer. Losses are sums over matched pairs (or all queries x classes for the class loss) divided by
``num_boxes`` = objects in the batch x DETR groups, averaged over processes, at least 1. Formulas and default
weights follow upstream RF-DETR 1.11.2 (see ``rfdetr-upstream.md`` section 3); the parity test checks them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rfdetr_core.errors import first_line
from rfdetr_train.losses import mask_entries
from rfdetr_train.losses.box_ops import box_cxcywh_to_xyxy, matched_generalized_box_iou
from rfdetr_train.losses.coefficients import LossWeights, MatchCosts
from rfdetr_train.losses.layer_batch import batched_layer_losses, can_batch_layers
from rfdetr_train.losses.loss_terms import ia_bce_terms, point_mask_terms
from rfdetr_train.losses.matcher import HungarianMatcher
from rfdetr_train.losses.point_sampling import (
    ImportancePointSampler,
    MatchPointSampler,
    PointSampler,
    loss_num_points,
    sample_points,
)
from rfdetr_train.losses.targets import LayerMatches, TargetBatch, TargetFormatError


class CriterionCompileError(RuntimeError):
    """The compiled loss pass (``compile_losses``) failed to compile; the message says what to do instead."""


@functools.cache
def _compiled_layer_losses(backend: str | Callable):
    """:func:`batched_layer_losses` through ``torch.compile`` with dynamic shapes: one wrapper per backend, shared
    by every criterion (Dynamo keeps the compiled graphs per wrapper, so a new criterion does not compile again).

    Python floats (the criterion's focal alpha and gamma) are traced as constants, not as symbolic inputs: with
    ``dynamic=True`` Dynamo otherwise passes each as a 0-d tensor read back with ``.item()``, and torch 2.11's
    inductor failed on that value used inside the IA-BCE ``autograd.Function`` ("Argument 'item' of Node
    'clamp_5' does not belong to this Graph"; reproduced on CPU, 2026-12-08; torch 2.15 compiles it). They are
    fixed per criterion, so a constant costs no recompilation.
    """
    compiled = torch.compile(batched_layer_losses, dynamic=True, backend=backend)

    @functools.wraps(batched_layer_losses)
    def run(*args, **kwargs):
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(*args, **kwargs)

    return run


class SetCriterion(nn.Module):
    """Set-prediction losses for all decoder layers and the two-stage output.

    Args:
        num_classes: class slots K of the model (``pred_logits [..., K]``); targets hold slots in ``[0, K)``.
        group_detr: query groups G in training (upstream 13). In ``eval()`` mode one group is used, as the
            model then emits only group 0.
        weights: loss weights (default :class:`LossWeights`, upstream's), in :attr:`weight_dict` and applied
            by :meth:`total_loss`.
        costs: matching costs of the matcher built here (default :class:`MatchCosts`, upstream's; the mask
            costs are dropped without ``segmentation``).
        segmentation: compute mask costs and losses (targets then need ``masks``).
        focal_alpha: IA-BCE exponent alpha: target score ``t = p^alpha * IoU^(1-alpha)``; also the focal alpha
            of the matcher's class cost.
        focal_gamma: the negatives' weight ``p^gamma``.
        mask_point_sample_ratio: loss points per mask ``max(h, h*w // ratio)``; matcher points ``h*w // ratio``.
        point_sampler: ``(mask_logits [M, 1, h, w], num_points) -> [M, num_points, 2]`` loss points, called once
            per layer with that layer's matched mask logits (no grad). Default: PointRend importance sampling.
        match_point_sampler: ``(num_points, device) -> [num_points, 2]``, the matcher's shared points.
        matcher: a ready :class:`HungarianMatcher` (then ``costs`` and the two previous arguments are its own).
        batch_layers: compute the losses of same-shaped layers in one batched pass (equal to the per-layer
            pass up to float32 summation order); False = always layer by layer; None (default) = batched on
            CUDA, where it saves kernel launches, and layer by layer elsewhere, which keeps the float order of
            0.1.x so that a seeded CPU run (the demo) repeats the numbers of earlier releases.
        compile_losses: run the batched pass (after matching) through ``torch.compile`` with dynamic shapes,
            which fuses its several hundred small operations: one graph whatever the pair count (no recompile
            per step), the same losses up to float rounding. ``True`` = inductor, a string = that backend
            (``"aot_eager"`` in the tests). Off by default: the eager criterion is what bounds a CUDA-graph
            training step, but the compiled pass has not yet been timed on a GPU. The matcher stays eager
            (its assignment runs on the host).
    """

    def __init__(
        self,
        num_classes: int,
        group_detr: int = 13,
        *,
        weights: LossWeights | None = None,
        costs: MatchCosts | None = None,
        segmentation: bool = True,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        mask_point_sample_ratio: int = 16,
        point_sampler: PointSampler | None = None,
        match_point_sampler: MatchPointSampler | None = None,
        matcher: HungarianMatcher | None = None,
        batch_layers: bool | None = None,
        compile_losses: bool | str = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if group_detr < 1:
            raise ValueError(f"group_detr must be >= 1, got {group_detr}")
        self.num_classes = num_classes
        self.group_detr = group_detr
        self.segmentation = segmentation
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.mask_point_sample_ratio = mask_point_sample_ratio
        self.batch_layers = batch_layers
        self.compile_losses = compile_losses
        self.point_sampler = point_sampler or ImportancePointSampler()
        if matcher is None:
            costs = costs if costs is not None else MatchCosts()
            matcher = HungarianMatcher(
                costs if segmentation else replace(costs, mask_ce=0.0, mask_dice=0.0),
                focal_alpha=focal_alpha,
                mask_point_sample_ratio=mask_point_sample_ratio,
                match_point_sampler=match_point_sampler,
            )
        self.matcher = matcher
        self.weight_dict: dict[str, float] = (weights if weights is not None else LossWeights()).by_loss(
            segmentation
        )
        self._weight_vectors: dict[tuple, Tensor] = {}  # (weights, device) -> [N] (see total_loss)

    # -- public API -------------------------------------------------------------------------------------

    def forward(
        self,
        outputs: dict[str, Any],
        targets: Sequence[dict[str, Tensor]],
        *,
        matches: Sequence[LayerMatches] | None = None,
    ) -> dict[str, Tensor]:
        """Unweighted losses of every layer.

        Args:
            outputs: ``pred_logits [B, G*Q, K]``, ``pred_boxes [B, G*Q, 4]`` (normalised cxcywh), ``pred_masks``
                (lazy ``{"spatial_features": [B, C, h, w], "query_features": [B, G*Q, C], "bias": [B, G*Q] or [1]}``
                or dense ``[B, G*Q, h, w]`` logits; :mod:`~rfdetr_train.losses.mask_entries`), optional ``aux_outputs`` (list of such dicts, earlier decoder
                layers first) and ``enc_outputs`` (one such dict).
            targets: per image ``labels [N]`` int64 slots, ``boxes [N, 4]`` normalised cxcywh, ``masks [N, h', w']``
                bool (any resolution; sampled in normalised coordinates). N may be 0.
            matches: precomputed :meth:`match` result (one per layer, in :meth:`layers` order); None = match now.

        Returns:
            ``{"loss_ce", "loss_bbox", "loss_giou", "loss_mask_ce", "loss_mask_dice"}`` scalars for the final
            layer, the same with ``_0`` ... for ``aux_outputs`` and ``_enc`` for ``enc_outputs``. A NaN/inf
            in the outputs gives a non-finite loss: check ``torch.isfinite(total)`` and skip the step.
        """
        layers = self.layers(outputs)
        device = layers[0][1]["pred_logits"].device
        # Losses in float32 whatever the autocast context: sums over thousands of queries x classes are
        # where half precision loses the signal.
        with torch.autocast(device_type=device.type, enabled=False):
            batch = TargetBatch.from_targets(targets, device, need_masks=self.segmentation)
            if matches is None:
                matches = self.matcher.match([out for _, out in layers], batch, self.active_groups)
            if len(matches) != len(layers):
                raise ValueError(f"{len(matches)} layer matches given for {len(layers)} output layers")
            num_boxes = self.num_boxes(batch, device)
            self._check_classes(layers)
            batched = device.type == "cuda" if self.batch_layers is None else self.batch_layers
            if batched and can_batch_layers([out for _, out in layers], matches):
                try:
                    stacked = self._batched_losses()(self, [out for _, out in layers], batch, matches, num_boxes)
                except torch._dynamo.exc.BackendCompilerFailed as exc:  # only a compiled pass raises this
                    cause = getattr(exc, "inner_exception", exc)  # what the backend raised, without torch's prefix
                    raise CriterionCompileError(
                        f"compile_losses / --compile-criterion: torch {torch.__version__} could not compile the "
                        f"loss pass ({f'{type(cause).__name__}: {first_line(cause)}'[:200]}). Train without "
                        "--compile-criterion; the model's --compile is not affected."
                    ) from exc
                per_layer = {name: value.unbind(0) for name, value in stacked.items()}  # [L] -> L scalars
                return {
                    name + suffix: per_layer[name][i]
                    for i, (suffix, _) in enumerate(layers)
                    for name in per_layer
                }
            losses: dict[str, Tensor] = {}
            for (suffix, out), layer_matches in zip(layers, matches):
                layer_losses = self._layer_losses(out, batch, layer_matches, num_boxes)
                losses.update({name + suffix: value for name, value in layer_losses.items()})
        return losses

    def match(self, outputs: dict[str, Any], targets: Sequence[dict[str, Tensor]]) -> list[LayerMatches]:
        """The Hungarian matches of every layer (what :meth:`forward` computes when ``matches`` is None)."""
        layers = self.layers(outputs)
        device = layers[0][1]["pred_logits"].device
        batch = TargetBatch.from_targets(targets, device, need_masks=self.segmentation)
        return self.matcher.match([out for _, out in layers], batch, self.active_groups)

    def _batched_losses(self):
        """:func:`batched_layer_losses`, through ``torch.compile`` when :attr:`compile_losses` is set."""
        if not self.compile_losses:
            return batched_layer_losses
        return _compiled_layer_losses("inductor" if self.compile_losses is True else self.compile_losses)

    @staticmethod
    def layers(outputs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """``(suffix, output dict)`` of every supervised layer: final, ``aux_outputs`` in order, ``enc_outputs``."""
        for key in ("pred_logits", "pred_boxes"):
            if key not in outputs:
                raise TargetFormatError(f"model outputs have no '{key}' (keys: {sorted(outputs)})")
        layers = [("", outputs)]
        layers += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs") or ())]
        if outputs.get("enc_outputs") is not None:
            layers.append(("_enc", outputs["enc_outputs"]))
        return layers

    @property
    def active_groups(self) -> int:
        return self.group_detr if self.training else 1

    def num_boxes(self, batch: TargetBatch, device: torch.device) -> Tensor:
        """Loss normaliser: objects x active groups, averaged over processes (all-reduce), at least 1."""
        # torch.full fills on the device; torch.tensor(value, device=cuda) would copy from pageable host memory.
        count = torch.full((), float(batch.total * self.active_groups), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
            count = count / torch.distributed.get_world_size()
        return count.clamp(min=1.0)

    def weight_for(self, key: str) -> float:
        """Weight of a loss key with or without a layer suffix (``loss_giou_2`` -> weight of ``loss_giou``)."""
        for name, weight in self.weight_dict.items():
            if key == name or (key.startswith(name + "_") and _is_layer_suffix(key[len(name) + 1 :])):
                return weight
        raise KeyError(f"no weight for loss '{key}' (weighted losses: {sorted(self.weight_dict)})")

    def total_loss(self, loss_dict: dict[str, Tensor]) -> Tensor:
        """Weighted sum of every loss in ``loss_dict`` (the scalar to backpropagate).

        On the CPU a left-to-right sum (the float order of the seeded CPU demo); elsewhere one weighted
        reduction of the stacked terms (:meth:`weighted_sum`), since a sum term by term is two kernel launches
        per term forward and again backward (about 120 at seg-medium's 30 terms) on a launch-bound step.
        """
        if not loss_dict:
            raise ValueError("no losses to sum")
        first = next(iter(loss_dict.values()))
        if first.device.type != "cpu" and len(loss_dict) > 1:
            return self.weighted_sum(loss_dict)
        return sum(self.weight_for(key) * value for key, value in loss_dict.items())

    def weighted_sum(self, loss_dict: dict[str, Tensor]) -> Tensor:
        """``sum(weight * loss)`` as one product of the stacked scalars ``[N]`` with the weights ``[N]`` (kept on
        the device per distinct weight list, so a step copies nothing); equal to :meth:`total_loss`'s term-by-term
        sum up to float summation order."""
        values = torch.stack(list(loss_dict.values()))  # N scalars -> [N]
        weights = tuple(self.weight_for(key) for key in loss_dict)
        cache_key = (weights, values.device, values.dtype)
        vector = self._weight_vectors.get(cache_key)
        if vector is None:
            vector = self._weight_vectors[cache_key] = torch.tensor(weights, dtype=values.dtype, device=values.device)
        return torch.dot(values, vector)

    # -- per layer --------------------------------------------------------------------------------------

    def _check_classes(self, layers: list[tuple[str, dict[str, Any]]]) -> None:
        for suffix, out in layers:
            slots = out["pred_logits"].shape[-1]
            if slots != self.num_classes:
                raise TargetFormatError(
                    f"pred_logits{suffix} have {slots} class slots but the criterion was built for "
                    f"num_classes={self.num_classes}"
                )
            if self.segmentation and "pred_masks" not in out:
                raise TargetFormatError("segmentation losses need 'pred_masks' in every output layer")

    def _layer_losses(
        self, out: dict[str, Any], batch: TargetBatch, matches: LayerMatches, num_boxes: Tensor
    ) -> dict[str, Tensor]:
        logits = out["pred_logits"].float()  # [B, GQ, K]
        boxes = out["pred_boxes"].float()  # [B, GQ, 4]
        b, q = matches.batch_idx, matches.query_idx
        src_boxes = boxes[b, q]  # [M, 4]
        tgt_boxes = batch.boxes[matches.flat_target_idx]  # [M, 4]
        tgt_labels = batch.labels[matches.flat_target_idx]  # [M]
        src_xyxy, tgt_xyxy = box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)

        losses = {
            "loss_ce": self._ia_bce(logits, (b, q, tgt_labels), src_xyxy.detach(), tgt_xyxy) / num_boxes
        }
        losses["loss_bbox"] = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        losses["loss_giou"] = (1 - matched_generalized_box_iou(src_xyxy, tgt_xyxy)).sum() / num_boxes
        if self.segmentation:
            losses.update(self._mask_losses(out["pred_masks"], batch, matches, num_boxes))
        return losses

    def _ia_bce(
        self, logits: Tensor, cells: tuple[Tensor, Tensor, Tensor], src_xyxy: Tensor, tgt_xyxy: Tensor
    ) -> Tensor:
        """IoU-aware BCE (:func:`~rfdetr_train.losses.loss_terms.ia_bce_terms`) summed over all queries x classes."""
        return ia_bce_terms(logits, cells, src_xyxy, tgt_xyxy, self.focal_alpha, self.focal_gamma).sum()

    def _matched_mask_logits(self, pred_masks: Any, matches: LayerMatches) -> Tensor:
        """Mask logits of the matched queries only: -> ``[M, h, w]`` float32.

        The products run in the features' own dtype (bf16 under autocast, as upstream's criterion computes them
        inside autocast); a float32 copy of every ``[B, C, h, w]`` map would be kept for the backward pass.
        """
        if isinstance(pred_masks, Tensor):
            return pred_masks[matches.batch_idx, matches.query_idx].float()
        spatial = pred_masks["spatial_features"]  # [B, C, h, w]
        query = pred_masks["query_features"].to(spatial.dtype)  # [B, GQ, C]
        bias = mask_entries.query_bias(pred_masks)[matches.batch_idx, matches.query_idx].float()  # [M]
        height, width = spatial.shape[-2:]
        parts, start = [], 0
        for b, n in enumerate(matches.counts):
            if n:
                q = query[b, matches.query_idx[start : start + n]]  # [n, C]
                parts.append((q @ spatial[b].flatten(1)).view(n, height, width))  # [n, h*w] -> [n, h, w]
            start += n
        return torch.cat(parts).float() + bias[:, None, None]

    def _mask_losses(
        self, pred_masks: Any, batch: TargetBatch, matches: LayerMatches, num_boxes: Tensor
    ) -> dict[str, Tensor]:
        if matches.num_pairs == 0:
            # Zero that still reaches every mask-head output, so no parameter goes without a gradient
            # (DDP without find_unused_parameters would otherwise stop on a batch without objects).
            if isinstance(pred_masks, Tensor):
                zero = pred_masks.sum() * 0.0
            else:
                zero = sum(pred_masks[k].sum() for k in ("spatial_features", "query_features", "bias")) * 0.0
            return {"loss_mask_ce": zero.float(), "loss_mask_dice": zero.float()}
        logits = self._matched_mask_logits(pred_masks, matches).unsqueeze(1)  # [M, 1, h, w]
        num_points = loss_num_points(logits.shape[-2], logits.shape[-1], self.mask_point_sample_ratio)
        with torch.no_grad():
            points = self.point_sampler(logits.detach(), num_points).to(logits.dtype)  # [M, P, 2]
        point_logits = sample_points(logits, points)[:, 0]  # [M, P]
        with torch.no_grad():
            labels = batch.sample_masks(matches.flat_target_idx, points)  # [M, P]
        bce, dice = point_mask_terms(point_logits, labels)  # two [M]
        return {"loss_mask_ce": bce.sum() / num_boxes, "loss_mask_dice": dice.sum() / num_boxes}


def _is_layer_suffix(text: str) -> bool:
    return text == "enc" or text.isdigit()


def build_criterion(
    num_classes: int,
    group_detr: int = 13,
    *,
    segmentation: bool = True,
    weights: LossWeights | None = None,
    costs: MatchCosts | None = None,
    focal_alpha: float = 0.25,
    mask_point_sample_ratio: int = 16,
    point_sampler: PointSampler | None = None,
    match_point_sampler: MatchPointSampler | None = None,
    compile_losses: bool | str = False,
) -> SetCriterion:
    """The criterion with its matcher; ``weights`` and ``costs`` default to upstream RF-DETR-Seg's values
    (:class:`LossWeights`, :class:`MatchCosts`)."""
    return SetCriterion(
        num_classes,
        group_detr,
        weights=weights,
        costs=costs,
        segmentation=segmentation,
        focal_alpha=focal_alpha,
        mask_point_sample_ratio=mask_point_sample_ratio,
        point_sampler=point_sampler,
        match_point_sampler=match_point_sampler,
        compile_losses=compile_losses,
    )
