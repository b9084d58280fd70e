"""Per-batch target packing shared by the matcher and the criterion, and the matching result type."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from rfdetr_core.errors import RFDETRError


class TargetFormatError(RFDETRError, ValueError):
    """Targets or model outputs whose keys or shapes do not follow the training contract."""


@dataclass(frozen=True)
class TargetBatch:
    """The targets of one batch, concatenated and padded once per step.

    Attributes:
        sizes: objects per image (host ints, known without a device sync).
        labels: ``[T]`` int64 class slots of all images, image after image (T = sum(sizes)).
        boxes: ``[T, 4]`` float32 normalised cxcywh.
        padded_labels: ``[B, Tmax]`` int64, 0 in padding.
        padded_boxes: ``[B, Tmax, 4]`` float32, 0 in padding.
        masks: per image ``[n_b, h_b, w_b]`` bool masks, or ``None`` without segmentation.
        mask_storage: ``[sum of n_b*h_b*w_b]`` every object's mask flattened, object after object (None without
            segmentation); one copy per step so every point lookup below is a single gather, whatever the
            images' mask sizes.
        mask_meta: ``[3, T]`` int64 start in ``mask_storage``, height and width of each object's mask.
        padded_slot: ``[T]`` int64 position ``b * Tmax + j`` of each object in the padded layout.
    """

    sizes: tuple[int, ...]
    labels: Tensor
    boxes: Tensor
    padded_labels: Tensor
    padded_boxes: Tensor
    masks: tuple[Tensor, ...] | None
    mask_storage: Tensor | None
    mask_meta: Tensor | None
    padded_slot: Tensor

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> list[int]:
        """Start of each image's objects in the concatenated tensors, plus the end: ``B + 1`` ints."""
        out = [0]
        for n in self.sizes:
            out.append(out[-1] + n)
        return out

    @classmethod
    def from_targets(
        cls, targets: Sequence[dict[str, Tensor]], device: torch.device, need_masks: bool
    ) -> TargetBatch:
        """Check and pack per-image targets (``labels [N]``, ``boxes [N, 4]`` cxcywh, ``masks [N, h, w]``)."""
        if len(targets) == 0:
            raise TargetFormatError(
                "the batch has no targets; give one dict per image (it may hold 0 objects)"
            )
        labels, boxes, masks = [], [], []
        for i, target in enumerate(targets):
            for key in ("labels", "boxes") + (("masks",) if need_masks else ()):
                if key not in target:
                    raise TargetFormatError(
                        f"target {i} has no '{key}'; each target needs labels [N], boxes [N, 4]"
                        + (" and masks [N, h, w] (segmentation)" if need_masks else "")
                    )
            lab, box = target["labels"], target["boxes"]
            n = lab.shape[0] if lab.dim() == 1 else -1
            if lab.dim() != 1 or box.shape != (n, 4):
                raise TargetFormatError(
                    f"target {i}: labels must be [N] and boxes [N, 4], got {tuple(lab.shape)} and {tuple(box.shape)}"
                )
            if lab.is_floating_point():
                raise TargetFormatError(f"target {i}: labels must be integer class slots, got {lab.dtype}")
            labels.append(lab.to(device=device, dtype=torch.int64))
            boxes.append(box.to(device=device, dtype=torch.float32))
            if need_masks:
                mask = target["masks"]
                if mask.dim() != 3 or mask.shape[0] != n:
                    raise TargetFormatError(
                        f"target {i}: masks must be [N, h, w] with N = {n} objects, got {tuple(mask.shape)}"
                    )
                masks.append(mask.to(device=device))
        sizes = tuple(lab.shape[0] for lab in labels)
        tmax = max(sizes)
        # Per-object bookkeeping is known on the host; it travels in one pinned, non-blocking copy (no sync).
        meta = [[b * tmax + j for b, n in enumerate(sizes) for j in range(n)]]
        if need_masks:
            starts, heights, widths, start = [], [], [], 0
            for mask in masks:
                n, h, w = mask.shape
                for j in range(n):
                    starts.append(start + j * h * w)
                    heights.append(h)
                    widths.append(w)
                start += n * h * w
            meta += [starts, heights, widths]
        meta_host = torch.tensor(meta, dtype=torch.int64).reshape(len(meta), sum(sizes))
        if device.type == "cuda":
            meta_dev = meta_host.pin_memory().to(device, non_blocking=True)
        else:
            meta_dev = meta_host.to(device)
        return cls(
            sizes=sizes,
            labels=torch.cat(labels),
            boxes=torch.cat(boxes),
            padded_labels=pad_sequence(labels, batch_first=True, padding_value=0),  # [B, Tmax]
            padded_boxes=pad_sequence(boxes, batch_first=True, padding_value=0.0),  # [B, Tmax, 4]
            masks=tuple(masks) if need_masks else None,
            mask_storage=torch.cat([m.reshape(-1) for m in masks]) if need_masks else None,
            mask_meta=meta_dev[1:] if need_masks else None,
            padded_slot=meta_dev[0],
        )

    def sample_masks(self, object_idx: Tensor, coords: Tensor) -> Tensor:
        """Nearest-sample ground-truth masks at normalised points, objects of any image and size at once.

        The arithmetic follows ``grid_sample(mode="nearest", align_corners=False, padding_mode="border")`` step
        for step (map to [-1, 1], unnormalise, round half to even, clamp), so indexing the boolean masks equals
        sampling them as float images, without converting whole masks to float.

        Args:
            object_idx: ``[M]`` int64 objects in the concatenated targets.
            coords: ``[M, P, 2]`` points (x, y) in ``[0, 1]`` per object, or ``[P, 2]`` shared by all.

        Returns:
            ``[M, P]`` float32 in {0, 1}.
        """
        if self.mask_storage is None or self.mask_meta is None:
            raise TargetFormatError("these targets were packed without masks")
        start, height, width = self.mask_meta[:, object_idx].unsqueeze(2).unbind(0)  # three [M, 1]
        grid = 2.0 * coords - 1.0
        x = ((grid[..., 0] + 1.0) * width - 1.0) / 2.0  # [M, P]
        y = ((grid[..., 1] + 1.0) * height - 1.0) / 2.0
        xi = torch.minimum(torch.round(x).long().clamp_(min=0), width - 1)
        yi = torch.minimum(torch.round(y).long().clamp_(min=0), height - 1)
        return self.mask_storage[start + yi * width + xi].float()


@dataclass(frozen=True)
class LayerMatches:
    """The Hungarian assignment of one output layer, all images and groups together.

    Pairs are ordered image by image; within an image group by group; within a group by query. Every GT
    object appears once per group.

    Attributes:
        batch_idx: ``[M]`` int64 image of each pair (on the outputs' device).
        query_idx: ``[M]`` int64 query (over all ``G*Q`` queries).
        target_idx: ``[M]`` int64 object within its image.
        flat_target_idx: ``[M]`` int64 object in the concatenated targets of :class:`TargetBatch`.
        counts: pairs per image (host ints).
    """

    batch_idx: Tensor
    query_idx: Tensor
    target_idx: Tensor
    flat_target_idx: Tensor
    counts: tuple[int, ...]

    @property
    def num_pairs(self) -> int:
        return sum(self.counts)

    def per_image(self) -> list[tuple[Tensor, Tensor]]:
        """DETR-style ``[(query_idx [m_b], target_idx [m_b]) for each image]`` on the CPU (for tests and logs)."""
        q, t = self.query_idx.cpu(), self.target_idx.cpu()
        out, start = [], 0
        for n in self.counts:
            out.append((q[start : start + n], t[start : start + n]))
            start += n
        return out

    @classmethod
    def from_per_image(
        cls, indices: Sequence[tuple[Tensor, Tensor]], sizes: Sequence[int], device: torch.device
    ) -> LayerMatches:
        """Build from DETR-style per-image ``(query_idx, target_idx)`` pairs, e.g. fixed matches in tests."""
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        batch, query, target, flat, counts = [], [], [], [], []
        for b, (q, t) in enumerate(indices):
            q = torch.as_tensor(q, dtype=torch.int64).reshape(-1)
            t = torch.as_tensor(t, dtype=torch.int64).reshape(-1)
            if q.shape != t.shape:
                raise ValueError(f"image {b}: {q.numel()} query indices but {t.numel()} target indices")
            batch.append(torch.full_like(q, b))
            query.append(q)
            target.append(t)
            flat.append(t + offsets[b])
            counts.append(q.numel())
        stacked = torch.stack([torch.cat(batch), torch.cat(query), torch.cat(target), torch.cat(flat)]).to(
            device
        )
        return cls(stacked[0], stacked[1], stacked[2], stacked[3], tuple(counts))
