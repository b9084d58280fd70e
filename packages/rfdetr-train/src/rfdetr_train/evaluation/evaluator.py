"""The evaluator used by training, ``rfdetr-train val`` and ``rfdetr-train eval``: reset / update / compute."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from rfdetr_core.errors import RFDETRError
from rfdetr_core.mask_rle import rle_area
from rfdetr_train.evaluation.boundary import boundary_fn, boundary_width
from rfdetr_train.evaluation.coco_matching import AREA_LABELS, CocoResult, evaluate_coco, stats_to_dict
from rfdetr_train.evaluation.coco_sets import DetectionSet, GroundTruthSet
from rfdetr_train.evaluation.confusion import ConfusionMatrix, confusion_matrix
from rfdetr_train.evaluation.per_class import ClassRow, format_table, overall_best_f1, per_class_table

IOU_TYPES = ("bbox", "segm")


@dataclass
class EvalReport:
    """What :meth:`Evaluator.compute` returns.

    Attributes:
        metrics: the nested metrics of DESIGN, ``{"bbox": {AP, AP50, ...}, "segm": {...}, "boundary": {...}}``
            (only the computed types).
        per_class: ``{"bbox": [ClassRow], "segm": [ClassRow]}``.
        confusion: ``{"bbox": ConfusionMatrix, "segm": ConfusionMatrix}`` at IoU ``confusion_iou`` and each
            class's best-F1 confidence.
        results: the full :class:`CocoResult` per type (precision/recall arrays, matches) for curves.
        detections, ground_truth, image_ids: what was evaluated (for the gallery and reports).
    """

    metrics: dict[str, dict[str, float]]
    per_class: dict[str, list[ClassRow]]
    confusion: dict[str, ConfusionMatrix]
    results: dict[str, CocoResult]
    detections: DetectionSet
    ground_truth: GroundTruthSet
    image_ids: np.ndarray
    extra: dict = field(default_factory=dict)

    def summary_text(self) -> str:
        """COCO-style summary lines of every computed type."""
        lines = []
        for kind, res in self.results.items():
            lines.append(f"{kind} ({len(self.image_ids)} images):")
            md = res.max_dets
            specs = [
                ("AP", "0.50:0.95", "all", md[-1]),
                ("AP", "0.50", "all", md[-1]),
                ("AP", "0.75", "all", md[-1]),
                *[("AP", "0.50:0.95", a, md[-1]) for a in AREA_LABELS[1:]],
                *[("AR", "0.50:0.95", "all", m) for m in md],
                *[("AR", "0.50:0.95", a, md[-1]) for a in AREA_LABELS[1:]],
            ]
            for (what, iou, area, m), v in zip(specs, res.stats, strict=True):
                lines.append(f"  {what} @[ IoU={iou:<9} | area={area:>6s} | maxDets={m:>3d} ] = {v:0.3f}")
            if (res.stats == -1).any():
                lines.append("  (-1: no ground-truth object in that size range, as pycocotools reports it)")
        if self.num_ground_truth() == 0:
            lines.append(self.no_ground_truth_note())
        return "\n".join(lines)

    def num_ground_truth(self) -> int:
        """Non-crowd ground-truth objects in the evaluated images."""
        gt = self.ground_truth
        return int(np.count_nonzero(np.isin(gt.image_id, self.image_ids) & ~gt.iscrowd))

    def no_ground_truth_note(self) -> str:
        return (
            f"No ground-truth objects in these {len(self.image_ids)} images: every AP and AR is -1 "
            "(pycocotools' value for 'nothing to measure'); add annotated images to this split to get metrics."
        )

    def per_class_text(self) -> str:
        text = "\n\n".join(
            format_table(rows, f"per class ({kind}):") for kind, rows in self.per_class.items()
        )
        return text + ("\n" + self.no_ground_truth_note() if self.num_ground_truth() == 0 else "")


def _as_int(x) -> int:
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


class Evaluator:
    """COCO box / mask (and optionally Boundary) evaluation of model outputs or ready detections.

    Args:
        ground_truth: a COCO dict, a ``pycocotools.coco.COCO`` or a :class:`GroundTruthSet`, with the
            dataset's own image and category ids.
        class_map: maps logit slots to dataset category ids (``rfdetr_core.class_map.ClassMap``); ``None``
            means slot = category id. Detections whose slot has no class are dropped.
        iou_types: subset of ``("bbox", "segm")``; default: ``segm`` too when the outputs carry masks.
        max_dets: detections kept per image (top-k over queries x slots) and COCO's largest ``maxDets``.
        backend: ``"fast"`` (vectorised, gated by equality tests) or ``"pycocotools"``.
        boundary: also compute Boundary AP (``metrics["boundary"]``); costs an erosion per mask, done on the
            device crops during :meth:`update`.
        mask_threshold: logit threshold of the upsampled masks (upstream: 0).
        mask_chunk_pixels: pixel budget of one chunk of mask upsampling (bounds peak memory).
        confusion_iou: IoU of a match in the confusion matrix.
        accelerator: an ``accelerate.Accelerator``; with several processes, :meth:`compute` gathers every
            process's detections (each image counted once) and every process gets the same report.
    """

    def __init__(
        self,
        ground_truth,
        class_map=None,
        *,
        iou_types: Sequence[str] | None = None,
        max_dets: int = 100,
        backend: str = "fast",
        boundary: bool = False,
        boundary_dilation_ratio: float = 0.02,
        mask_threshold: float = 0.0,
        mask_chunk_pixels: int = 1 << 23,
        confusion_iou: float = 0.5,
        accelerator=None,
    ):
        self.gt = (
            ground_truth
            if isinstance(ground_truth, GroundTruthSet)
            else GroundTruthSet.from_coco(ground_truth)
        )
        if iou_types is not None and not set(iou_types) <= set(IOU_TYPES):
            raise RFDETRError(f"iou_types must be a subset of {IOU_TYPES}, got {list(iou_types)}")
        if backend not in ("fast", "pycocotools"):
            raise RFDETRError(f"Unknown evaluation backend {backend!r}; use 'fast' or 'pycocotools'.")
        if max_dets < 1:
            raise RFDETRError(f"max_dets must be >= 1, got {max_dets}")
        self.class_map = class_map
        self.iou_types = tuple(iou_types) if iou_types is not None else None
        self.max_dets = int(max_dets)
        self.backend = backend
        self.boundary = boundary
        self.boundary_dilation_ratio = boundary_dilation_ratio
        self.mask_threshold = mask_threshold
        self.mask_chunk_pixels = mask_chunk_pixels
        self.confusion_iou = confusion_iou
        self.accelerator = accelerator
        self._table_cache: dict = {}
        self.reset()

    @classmethod
    def from_config(cls, ground_truth, config, class_map=None, accelerator=None, training: bool = True):
        """Build from an :class:`~rfdetr_train.evaluation.config.EvalConfig` (Boundary AP: ``config.boundary``
        during training, always in ``val``/``eval`` i.e. ``training=False``)."""
        return cls(
            ground_truth,
            class_map,
            max_dets=config.max_dets,
            backend=config.backend,
            boundary=config.boundary or not training,
            boundary_dilation_ratio=config.boundary_dilation_ratio,
            mask_threshold=config.mask_threshold,
            mask_chunk_pixels=config.mask_chunk_pixels,
            confusion_iou=config.confusion_iou,
            accelerator=accelerator,
        )

    def reset(self) -> None:
        """Forget all detections (call before each validation)."""
        self._parts: list[DetectionSet] = []
        self._seen: list[int] = []

    # -- accumulation -----------------------------------------------------------------------------------
    def _slot_table(self, num_slots: int, device) -> torch.Tensor:
        key = (num_slots, str(device))
        if key not in self._table_cache:
            if self.class_map is None:
                table = torch.arange(num_slots)
            else:
                t = self.class_map.slot_to_category_table()
                if len(t) < num_slots:
                    t = t + [-1] * (num_slots - len(t))
                table = torch.tensor(t[:num_slots])
            self._table_cache[key] = table.to(device)
        return self._table_cache[key]

    @torch.no_grad()
    def update(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping]) -> None:
        """Add one batch of model outputs.

        Args:
            outputs: ``pred_logits [B, Q, K]``, ``pred_boxes [B, Q, 4]`` normalised cxcywh and optionally
                ``pred_masks [B, Q, h, w]`` mask logits (eval output dict of DESIGN).
            targets: ``B`` dicts with ``image_id`` (the dataset's id) and ``orig_size`` (source ``(h, w)``).
        """
        from rfdetr_core.postprocess import select_detections

        logits, boxes = outputs["pred_logits"].detach(), outputs["pred_boxes"].detach()
        masks = self._masks_to_score(outputs.get("pred_masks"))
        table = self._slot_table(logits.shape[2], logits.device)  # [K] category ids, -1: slot without a class
        # the graph-safe half of post-processing: top max_dets pairs, their boxes and mask logits [B, N, ...]
        selected = select_detections(
            logits.float(), boxes.float(), masks.detach() if masks is not None else None, table, self.max_dets
        )
        self.update_selected(*selected, targets)

    def _masks_to_score(self, masks: torch.Tensor | None) -> torch.Tensor | None:
        if self.iou_types is not None and "segm" not in self.iou_types:
            return None
        if self.iou_types is not None and "segm" in self.iou_types and masks is None:
            raise RFDETRError("segm evaluation was asked for but the model outputs have no 'pred_masks'.")
        return masks

    @torch.no_grad()
    def update_selected(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        boxes: torch.Tensor,
        masks: torch.Tensor | None,
        targets: Sequence[Mapping],
    ) -> None:
        """Add one batch of already selected detections: the graph-safe half's outputs, e.g. an exported
        model's (a runner of ``rfdetr_core.runner``).

        Args:
            scores: ``[B, N]`` descending; labels: ``[B, N]`` dataset category ids (``-1``: slot without a
                class); boxes: ``[B, N, 4]`` xyxy normalised to ``[0, 1]``; masks: ``[B, N, h, w]`` mask
                logits or ``None``. Only the first ``max_dets`` of each image are scored (the top
                ``max_dets`` when ``N`` is larger: the rows are in descending score order).
            targets: as in :meth:`update`.
        """
        from rfdetr_core.postprocess import finish_detections

        masks = self._masks_to_score(masks)
        if len(targets) != scores.shape[0]:
            raise RFDETRError(f"{scores.shape[0]} outputs but {len(targets)} targets in this batch.")
        n = self.max_dets
        scores, cats, boxes_n = scores[:, :n].float(), labels[:, :n], boxes[:, :n].float()
        picked = masks[:, :n].detach() if masks is not None else None
        sizes = torch.stack([torch.as_tensor(t["orig_size"]).reshape(2) for t in targets]).to(scores.device)
        for i, t in enumerate(targets):
            image_id = _as_int(t["image_id"])
            self._seen.append(image_id)
            h, w = (int(v) for v in sizes[i].tolist())
            opts = None
            if masks is not None:
                expect = self.gt.image_sizes.get(image_id)
                if expect is not None and expect != (h, w):
                    # pycocotools would give such masks IoU -1 against every object, silently
                    raise RFDETRError(
                        f"Image {image_id}: the target's orig_size is {h}x{w} (h x w) but the ground truth "
                        f"says {expect[0]}x{expect[1]}; masks must be evaluated at the annotated size."
                    )
                d = boundary_width(h, w, self.boundary_dilation_ratio) if self.boundary else None
                opts = {
                    "threshold": self.mask_threshold,
                    "pixel_budget": self.mask_chunk_pixels,
                    "boundary": boundary_fn(d) if d else None,
                }
            # the host half: drop slots without a class, boxes in pixels, masks as RLE at the source size
            (res,) = finish_detections(
                scores[i : i + 1],
                cats[i : i + 1],
                boxes_n[i : i + 1],
                picked[i : i + 1] if picked is not None else None,
                sizes[i : i + 1].float(),
                mask_format="rle" if masks is not None else "none",
                rle_options=opts,
            )
            b = res["boxes"].cpu().double().numpy()
            bbox = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
            n = len(res["scores"])
            rles, areas, bounds = res.get("rles"), res.get("areas"), res.get("boundary_rles")
            self._parts.append(
                DetectionSet(
                    image_id=np.full(n, image_id, dtype=np.int64),
                    category_id=res["labels"].cpu().numpy().astype(np.int64),
                    score=res["scores"].cpu().double().numpy(),
                    bbox=bbox.reshape(-1, 4),
                    rles=rles,
                    mask_area=areas,
                    boundary_rles=bounds,
                )
            )

    def add_detections(
        self,
        image_id: int,
        boxes_xyxy,
        scores,
        category_ids,
        rles: list[dict] | None = None,
        mask_areas=None,
    ) -> None:
        """Add ready detections of one image (source pixels, dataset category ids, masks as COCO RLE)."""
        b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        self._seen.append(int(image_id))
        if rles is not None and mask_areas is None:
            mask_areas = rle_area(rles)
        self._parts.append(
            DetectionSet(
                image_id=np.full(b.shape[0], int(image_id), dtype=np.int64),
                category_id=np.asarray(category_ids, dtype=np.int64).reshape(-1),
                score=np.asarray(scores, dtype=np.float64).reshape(-1),
                bbox=np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1),
                rles=list(rles) if rles is not None else None,
                mask_area=None if mask_areas is None else np.asarray(mask_areas, dtype=np.float64),
            )
        )

    def add_detection_set(self, detections: DetectionSet, image_ids) -> None:
        """Add detections of many images at once (e.g. a results file); ``image_ids`` are the evaluated
        images, including those without detections."""
        self._seen.extend(int(i) for i in image_ids)
        self._parts.append(detections)

    # -- results -----------------------------------------------------------------------------------------
    def _gathered(self) -> tuple[DetectionSet, list[int]]:
        parts, seen = self._parts, self._seen
        acc = self.accelerator
        if acc is not None and getattr(acc, "num_processes", 1) > 1:
            from accelerate.utils import gather_object

            # One object per process: its detections and the images it saw. Samplers pad the last batch
            # with repeated images, so each image keeps the detections of the first process that saw it.
            everyone = gather_object([(DetectionSet.concatenate(parts), list(seen))])
            owner: dict[int, int] = {}
            for rank, (_, ids) in enumerate(everyone):
                for i in ids:
                    owner.setdefault(i, rank)
            parts = []
            for rank, (d, _) in enumerate(everyone):
                sel = np.array([owner[int(i)] == rank for i in d.image_id], dtype=bool)
                parts.append(_select(d, sel))
            seen = sorted(owner)
        return DetectionSet.concatenate(parts), seen

    def compute(self) -> EvalReport:
        """Metrics, per-class tables and confusion matrices of everything added since :meth:`reset`."""
        from rfdetr_train.evaluation.boundary import boundary_rles_for
        from rfdetr_train.evaluation.coco_reference import evaluate_coco_reference

        dt, seen = self._gathered()
        if not seen:
            raise RFDETRError("Nothing to evaluate: update() was never called since reset().")
        unknown = sorted(set(seen) - set(self.gt.image_sizes))
        if unknown:
            raise RFDETRError(
                f"Image id {unknown[0]} is not in the ground truth ({len(unknown)} unknown ids); the data "
                "loader's 'image_id' must be the dataset's own id."
            )
        types = self.iou_types or (IOU_TYPES if dt.rles is not None else ("bbox",))
        run = evaluate_coco if self.backend == "fast" else evaluate_coco_reference
        metrics, per_class, conf, results = {}, {}, {}, {}
        for kind in types:
            res = run(self.gt, dt, kind, seen, max_dets=self.max_dets)
            results[kind] = res
            metrics[kind] = stats_to_dict(res.stats, res.max_dets)
            rows = per_class_table(res, self.gt)
            per_class[kind] = rows
            fallback = overall_best_f1(res)[3]
            thr = [r.confidence if not np.isnan(r.confidence) else fallback for r in rows]
            thr = [t if not np.isnan(t) else np.inf for t in thr]
            conf[kind] = confusion_matrix(self.gt, dt, kind, seen, res.cat_ids, thr, self.confusion_iou)
        if self.boundary and "segm" in types:
            bound = boundary_rles_for(self.gt, dt, self.boundary_dilation_ratio, seen)
            res = run(self.gt, dt, "segm", seen, max_dets=self.max_dets, boundary_rles=bound)
            results["boundary"] = res
            metrics["boundary"] = stats_to_dict(res.stats, res.max_dets)
        return EvalReport(metrics, per_class, conf, results, dt, self.gt, np.unique(np.asarray(seen)))


def _select(d: DetectionSet, sel: np.ndarray) -> DetectionSet:
    idx = np.flatnonzero(sel)
    return DetectionSet(
        d.image_id[idx],
        d.category_id[idx],
        d.score[idx],
        d.bbox[idx],
        None if d.rles is None else [d.rles[i] for i in idx],
        None if d.mask_area is None else d.mask_area[idx],
        None if d.boundary_rles is None else [d.boundary_rles[i] for i in idx],
        d.area_rule,
    )
