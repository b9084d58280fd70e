"""The automatic check after every export: the exported file against PyTorch on the same pixels.

Both run the same normalised batch (built-in synthetic images, or the user's ``--check-images DIR``); each
exported detection is matched to the PyTorch detection of the same label with the closest box, and the
worst score error, box error (pixels at the source size) and mask IoU (logits upsampled to the source size
and thresholded at 0, as predict does) over all ``K`` selected detections are reported against the
tolerances (:data:`TOLERANCES`). Batch 1, and batch 3 for graphs with a dynamic batch axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rfdetr_core.errors import RFDETRError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Tolerance:
    score: float  # max |score difference|
    box_px: float  # max box corner difference in source pixels
    mask_iou: float  # min mask IoU per detection


TOLERANCES = {"float32": Tolerance(1e-3, 0.5, 0.99), "float16": Tolerance(1e-2, 2.0, 0.97)}


class CheckFailedError(RFDETRError):
    """The exported model disagrees with PyTorch beyond the tolerances."""


@dataclass
class CheckResult:
    batch: int
    detections: int
    score_error: float
    box_error_px: float
    min_mask_iou: float
    unmatched: int
    tolerance: Tolerance

    @property
    def ok(self) -> bool:
        t = self.tolerance
        return (
            self.unmatched == 0
            and self.score_error <= t.score
            and self.box_error_px <= t.box_px
            and self.min_mask_iou >= t.mask_iou
        )

    def line(self) -> str:
        t = self.tolerance
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"check batch {self.batch}: {self.detections} detections, score error {self.score_error:.2e} "
            f"(<= {t.score:g}), box error {self.box_error_px:.3f} px (<= {t.box_px:g}), mask IoU min "
            f"{self.min_mask_iou:.4f} (>= {t.mask_iou:g}), unmatched {self.unmatched}: {verdict}"
        )


def synthetic_images(count: int, size: tuple[int, int] = (360, 480), seed: int = 0) -> list[np.ndarray]:
    """``count`` deterministic RGB uint8 ``H x W x 3`` images: a gradient background with filled discs and
    rectangles of random colours (something for the masks to find), each a different aspect from the input."""
    rng = np.random.default_rng(seed)
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    images = []
    for _ in range(count):
        base = rng.uniform(40, 200, size=3)
        img = base + 40 * np.stack([xx / width, yy / height, (xx + yy) / (width + height)], -1)
        for _ in range(int(rng.integers(3, 7))):
            colour = rng.uniform(0, 255, size=3)
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            r = rng.uniform(0.05, 0.25) * min(height, width)
            if rng.random() < 0.5:
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = colour
            else:
                img[(abs(yy - cy) < r) & (abs(xx - cx) < 1.4 * r)] = colour
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def load_check_images(folder: str | Path | None, count: int) -> list:
    """``count`` images from ``folder`` (sorted, cycled when fewer), else synthetic ones."""
    if folder is None:
        return synthetic_images(count)
    folder = Path(folder)
    if not folder.is_dir():
        raise RFDETRError(f"--check-images {folder}: not a folder of images.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RFDETRError(f"--check-images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it.")
    return [files[i % len(files)] for i in range(count)]


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [N, 4]``, ``b [M, 4]`` xyxy -> IoU ``[N, M]``."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp_min(1e-12)


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def compare_outputs(
    exported: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    source_sizes: Sequence[tuple[int, int]],
    tolerance: Tolerance,
) -> CheckResult:
    """Compare two deploy tuples ``(scores [B,K], labels [B,K], boxes [B,K,4], masks [B,K,h,w])``.

    Detection ``k`` of both is paired when labels agree and boxes overlap (IoU > 0.5); any other exported
    detection is matched to an unused reference detection of the same label maximising ``box IoU - |score
    difference|`` (ranks swap where scores tie); one without a partner counts as unmatched.
    """
    from rfdetr_core.postprocess import upsample_masks

    scores_e, labels_e, boxes_e, masks_e = (t.detach().cpu() for t in exported)
    scores_r, labels_r, boxes_r, masks_r = (t.detach().cpu() for t in reference)
    score_err = box_err = 0.0
    min_iou, unmatched, total = 1.0, 0, 0
    for i, (h, w) in enumerate(source_sizes):
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        be, br = boxes_e[i].float() * scale, boxes_r[i].float() * scale
        iou = _box_iou(be, br)
        same = labels_e[i][:, None] == labels_r[i][None, :]
        cost = torch.where(same, iou - (scores_e[i][:, None] - scores_r[i][None, :]).abs(), -math.inf)
        # Same rank, same label, overlapping box: the usual case. The rest (ranks swapped where scores tie)
        # are matched greedily.
        n = min(len(be), len(br))
        ranked = same.diagonal()[:n] & (iou.diagonal()[:n] > 0.5)
        used = torch.zeros(len(br), dtype=torch.bool)
        used[:n] = ranked
        pairs = [(k, k) for k in range(n) if ranked[k]]
        for k in range(len(be)):
            if k < n and ranked[k]:
                continue
            row = cost[k].masked_fill(used, -math.inf)
            j = int(row.argmax())
            if not math.isfinite(float(row[j])):
                unmatched += 1
                continue
            used[j] = True
            pairs.append((k, j))
        total += len(be)
        if not pairs:
            continue
        ke = torch.tensor([k for k, _ in pairs])
        kr = torch.tensor([j for _, j in pairs])
        score_err = max(score_err, float((scores_e[i][ke] - scores_r[i][kr]).abs().max()))
        box_err = max(box_err, float((be[ke] - br[kr]).abs().max()))
        up_e = upsample_masks(masks_e[i][ke].float(), (h, w))
        up_r = upsample_masks(masks_r[i][kr].float(), (h, w))
        for a, b in zip(up_e, up_r, strict=True):
            min_iou = min(min_iou, _mask_iou(a, b))
    return CheckResult(len(source_sizes), total, score_err, box_err, min_iou, unmatched, tolerance)


def run_check(
    exported: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    reference: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    *,
    resolution: tuple[int, int],
    preprocess_config,
    batches: Sequence[int],
    half: bool,
    images_dir: str | Path | None = None,
) -> list[CheckResult]:
    """Run both callables (``images [B,3,H,W]`` -> deploy tuple) at each batch size and compare them."""
    from rfdetr_core.preprocess import preprocess

    tolerance = TOLERANCES["float16" if half else "float32"]
    images = load_check_images(images_dir, max(batches))
    results = []
    for batch in batches:
        x, sizes = preprocess(images[:batch], resolution, preprocess_config)
        with torch.inference_mode():
            ref = reference(x)
        results.append(compare_outputs(exported(x), ref, sizes, tolerance))
    return results


def decoded_raw(raw_fn: Callable[[torch.Tensor], Sequence[torch.Tensor]], card) -> Callable:
    """A ``--raw`` graph's callable (``pred_logits, pred_boxes, pred_masks``) as a deploy-tuple callable, through
    core's graph-safe half in float32 with the card's class map and ``K``."""
    from rfdetr_core.postprocess import select_detections

    slot_category = torch.tensor(card.class_map.slot_to_category_table(), dtype=torch.int64)
    num_select = min(card.default_num_select, card.num_queries * card.num_slots)

    def decode(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = [o.float() for o in raw_fn(images)]
        masks = outputs[2] if len(outputs) > 2 else None
        picked = select_detections(outputs[0], outputs[1], masks, slot_category, num_select)
        return tuple(t for t in picked if t is not None)

    return decode
