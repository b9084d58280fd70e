"""The automatic check after every export: the exported file against PyTorch on the same pixels.

Both run the same normalised batch (built-in synthetic images, or the user's ``--check-images DIR``); the
``K`` detections of each image are paired (:func:`compare_outputs`) and the worst score error, box error
(pixels at the source size) and mask IoU (logits upsampled to the source size and thresholded at 0, as
predict does) over all pairs are reported against the tolerances (:data:`TOLERANCES`). Batch 1, and batch 3
for graphs with a dynamic batch axis.

*Ties.* Scores are float32 sigmoids, which round to exactly 1.0 above logit ~16.6 and sit one ulp (6e-8)
apart just below; two runtimes whose sigmoids differ in the last bit (ONNX Runtime's and torch's do, for
about a third of the logits above 10) then order tied pairs differently, and where a tie straddles the
``K``-th place they even keep different pairs. The pairing is therefore tie-aware, in three steps:

1. the same rank, the same label and the same box (IoU > 0.5, or corners within the box tolerance);
2. any other rank with the same label, the same box and a score within the score tolerance (a swap among
   tied scores);
3. what is left on both sides must have scores within the score tolerance of the other side's ``K``-th
   score (a tie at the cut-off: either side could keep it), and is counted as ``cutoff_ties``; anything
   else is ``unmatched`` and fails.

Every paired detection is then held to the strict score, box and mask tolerances.

*int8.* A quantized graph moves every score by up to a few hundredths, so among the low-scoring pairs of
barely separated scores (most of the ``K``) ranks and even proposals change; what must survive are the
detections a user keeps. Its tolerance therefore has a ``min_score``: detections scoring above
``min_score - score tolerance`` on each side are paired (so one that crosses the cut between the two sides,
within the tolerance, still finds its partner), and what is left over fails only if it scores above
``min_score``. Images where the float32 model finds nothing above it (random weights) compare nothing, which
the result says (``compared == 0``) rather than calling it agreement.
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
    min_score: float = 0.0  # compare only detections scoring above this (0: all K; module docstring, int8)


TOLERANCES = {
    "float32": Tolerance(1e-3, 0.5, 0.99),
    "float16": Tolerance(1e-2, 2.0, 0.97),
    # int8 (module docstring): about twice what the CPU demo's trained seg-tiny gave on its validation images
    # (score 0.020, box 0.75 px, mask IoU 0.964 at worst; docs/benchmarks.md, issue 14, --int8)
    "int8": Tolerance(0.05, 4.0, 0.9, min_score=0.3),
}


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
    cutoff_ties: int = 0  # unpaired detections tied with the other side's K-th score (module docstring)
    compared: int | None = None  # reference detections above ``tolerance.min_score`` (None: all K compared)

    @property
    def nothing_compared(self) -> bool:
        """A ``min_score`` check that found no confident detection to compare (random weights)."""
        return self.compared == 0 and self.unmatched == 0

    @property
    def _paired_within(self) -> bool:
        """Every detection paired, scores and boxes within the tolerances (everything but the masks)."""
        t = self.tolerance
        return self.unmatched == 0 and self.score_error <= t.score and self.box_error_px <= t.box_px

    @property
    def ok(self) -> bool:
        return self._paired_within and self.min_mask_iou >= self.tolerance.mask_iou

    @property
    def only_masks_off(self) -> bool:
        """Failed on the mask IoU alone: every detection paired, scores and boxes within the tolerances."""
        return self._paired_within and not self.ok

    def line(self) -> str:
        t = self.tolerance
        verdict = "ok" if self.ok else "FAILED"
        if self.nothing_compared:
            return (
                f"check batch {self.batch}: no detection scores above {t.min_score:g} on these images, so "
                "nothing was compared (random or barely trained weights?); run it on trained weights with "
                "--check-images DIR"
            )
        scope = (
            f"{self.detections} detections"
            if self.compared is None
            else f"{self.compared} detections above score {t.min_score:g}"
        )
        return (
            f"check batch {self.batch}: {scope}, score error {self.score_error:.2e} "
            f"(<= {t.score:g}), box error {self.box_error_px:.3f} px (<= {t.box_px:g}), mask IoU min "
            f"{self.min_mask_iou:.4f} (>= {t.mask_iou:g}), ties at the cut-off {self.cutoff_ties}, unmatched "
            f"{self.unmatched}: {verdict}"
        )


def failure_hint(results: Sequence[CheckResult]) -> str | None:
    """What to tell the user when an int8 check failed, or a check failed on the mask IoU alone (``None``
    otherwise)."""
    failed = [r for r in results if not r.ok]
    if failed and all(r.tolerance.min_score > 0 for r in failed):
        return (
            "int8 moves every score by up to a few hundredths; where the model's two-stage proposals score that "
            "close to each other (random or barely trained weights) it picks other proposals, so detections "
            "differ, not just drift. For trained weights, check on your own images with --check-images DIR and "
            "measure the metrics with rfdetr-train val --weights FILE. The file was written either way."
        )
    if not failed or not all(r.only_masks_off for r in failed):
        return None
    return (
        "Only the mask IoU is off: every detection paired, and scores and boxes agree. Masks whose logits sit "
        "near 0 over much of the image (random or barely trained weights) flip pixels when the float order "
        "differs (another runtime, CPU or torch version), so this is expected for them; for trained weights, "
        "check on your own images with --check-images DIR. The file was written either way."
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


def _pair_detections(
    scores_e: torch.Tensor,
    labels_e: torch.Tensor,
    boxes_e: torch.Tensor,
    scores_r: torch.Tensor,
    labels_r: torch.Tensor,
    boxes_r: torch.Tensor,
    score_tol: float,
    box_tol: float,
    cutoff: float | None = None,
) -> tuple[list[tuple[int, int]], int, int]:
    """Tie-aware pairing of one image's detections (module docstring): ``scores [K]``, ``labels [K]``,
    ``boxes [K, 4]`` (pixels) of each side -> ``(pairs [(k_exported, k_reference)], cutoff_ties, unmatched)``.

    Two boxes are the same box when they overlap (IoU > 0.5) or their corners are within ``box_tol`` pixels
    (boxes of zero width or height, common in barely trained models, have no IoU). ``cutoff``: the score
    both sides were cut at (a ``min_score``), instead of each side's own ``K``-th score.
    """
    n_e, n_r = len(scores_e), len(scores_r)
    corners = (boxes_e[:, None, :] - boxes_r[None, :, :]).abs().amax(-1)  # [Ke, Kr]
    overlap = (_box_iou(boxes_e, boxes_r) > 0.5) | (corners <= box_tol)
    same = (labels_e[:, None] == labels_r[None, :]) & overlap
    gap = (scores_e[:, None] - scores_r[None, :]).abs()  # [Ke, Kr]
    close = gap <= score_tol
    n = min(n_e, n_r)
    ranked = same.diagonal()[:n]
    used_e = torch.zeros(n_e, dtype=torch.bool)
    used_r = torch.zeros(n_r, dtype=torch.bool)
    used_e[:n], used_r[:n] = ranked, ranked
    pairs = [(k, k) for k in range(n) if ranked[k]]
    # a swap among tied scores: same label, same box, score within the tolerance; nearest score first
    for k in range(n_e):
        if used_e[k]:
            continue
        ok = same[k] & close[k] & ~used_r
        if bool(ok.any()):
            j = int(gap[k].masked_fill(~ok, math.inf).argmin())
            used_e[k] = used_r[j] = True
            pairs.append((k, j))
    # a tie at the cut-off: left over on one side, and as good as the other side's K-th score
    if cutoff is not None:
        last_e = last_r = cutoff
    else:
        last_e = float(scores_e.min()) if n_e else -math.inf
        last_r = float(scores_r.min()) if n_r else -math.inf
    left_e, left_r = scores_e[~used_e], scores_r[~used_r]
    tied = int((left_e <= last_r + score_tol).sum() + (left_r <= last_e + score_tol).sum())
    unmatched = len(left_e) + len(left_r) - tied
    return pairs, tied, unmatched


def compare_outputs(
    exported: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    source_sizes: Sequence[tuple[int, int]],
    tolerance: Tolerance,
) -> CheckResult:
    """Compare two deploy tuples ``(scores [B,K], labels [B,K], boxes [B,K,4], masks [B,K,h,w])``.

    Detections are paired tie-aware (module docstring); the paired ones give the score, box (source pixels)
    and mask-IoU numbers, the unpaired ones count as ``cutoff_ties`` (scores tied with the other side's
    ``K``-th) or ``unmatched`` (a failure). With ``tolerance.min_score`` only detections scoring above
    ``min_score - score tolerance`` take part, and a leftover fails only above ``min_score`` (module docstring).
    """
    from rfdetr_core.postprocess import upsample_masks

    scores_e, labels_e, boxes_e, masks_e = (t.detach().cpu() for t in exported)
    scores_r, labels_r, boxes_r, masks_r = (t.detach().cpu() for t in reference)
    score_err = box_err = 0.0
    min_iou, unmatched, ties, total = 1.0, 0, 0, 0
    floor = tolerance.min_score if tolerance.min_score > 0 else None
    compared = 0 if floor is not None else None
    for i, (h, w) in enumerate(source_sizes):
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        be, br = boxes_e[i].float() * scale, boxes_r[i].float() * scale
        se, sr = scores_e[i].float(), scores_r[i].float()
        le, lr = labels_e[i], labels_r[i]
        me, mr = masks_e[i], masks_r[i]
        band = None
        if floor is not None:
            band = floor - tolerance.score  # a leftover at or below band + tolerance = floor is not confident
            compared += int((sr > floor).sum())
            keep_e, keep_r = se > band, sr > band
            be, se, le, me = be[keep_e], se[keep_e], le[keep_e], me[keep_e]
            br, sr, lr, mr = br[keep_r], sr[keep_r], lr[keep_r], mr[keep_r]
        pairs, tied, missing = _pair_detections(
            se, le, be, sr, lr, br, tolerance.score, tolerance.box_px, cutoff=band
        )
        ties += tied
        unmatched += missing
        total += len(be)
        if not pairs:
            continue
        ke = torch.tensor([k for k, _ in pairs])
        kr = torch.tensor([j for _, j in pairs])
        score_err = max(score_err, float((se[ke] - sr[kr]).abs().max()))
        box_err = max(box_err, float((be[ke] - br[kr]).abs().max()))
        up_e = upsample_masks(me[ke].float(), (h, w))
        up_r = upsample_masks(mr[kr].float(), (h, w))
        for a, b in zip(up_e, up_r, strict=True):
            min_iou = min(min_iou, _mask_iou(a, b))
    return CheckResult(
        len(source_sizes), total, score_err, box_err, min_iou, unmatched, tolerance, ties, compared
    )


def run_check(
    exported: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    reference: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    *,
    resolution: tuple[int, int],
    preprocess_config,
    batches: Sequence[int],
    precision: str = "float32",
    images_dir: str | Path | None = None,
) -> list[CheckResult]:
    """Run both callables (``images [B,3,H,W]`` -> deploy tuple) at each batch size and compare them with
    the tolerances of ``precision`` (a key of :data:`TOLERANCES`)."""
    from rfdetr_core.preprocess import preprocess

    tolerance = TOLERANCES[precision]
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
