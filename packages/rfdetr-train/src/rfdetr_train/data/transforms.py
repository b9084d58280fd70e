"""Geometric pipelines of the built-in training and validation transforms.

Both pipelines first choose a :class:`GeometricPlan` (a crop box in source pixels, a flip and an output size)
from the sample's own random generator, then :mod:`rfdetr_train.data.dataset` carries out the plan once: the
image is decoded (at reduced scale when the plan allows, JPEG draft mode), cropped, resized and normalised
by :func:`rfdetr_core.preprocess.resize_normalize`, and flipped; polygons get the same affine map and are
rasterised directly at the output size, RLE masks are decoded, cropped and resized with nearest-exact.

Training (upstream RF-DETR's default recipe, ``rfdetr-upstream.md`` section 5.1): horizontal flip with p 0.5;
with p 0.5 a direct resize to the output size, otherwise a virtual shortest-side resize to one of
(400, 500, 600) px followed by a random crop of 384-600 px per side, then the resize. Validation: the whole
image resized to the model resolution, no randomness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GeometricPlan:
    """What happens to one sample: ``crop`` = (x0, y0, x1, y1) in source pixels (integers, x1/y1 exclusive),
    then resize to ``out_size`` = (H, W), then a horizontal flip if ``flip``."""

    crop: tuple[int, int, int, int]
    flip: bool
    out_size: tuple[int, int]

    @property
    def crop_size(self) -> tuple[int, int]:
        """(h, w) of the crop in source pixels."""
        x0, y0, x1, y1 = self.crop
        return y1 - y0, x1 - x0

    def decode_min_size(self, source_size: tuple[int, int]) -> tuple[int, int]:
        """Smallest decoded size (H, W) of the whole image at which the crop still has ``out_size`` pixels;
        JPEG draft decoding may reduce the image down to it."""
        h, w = source_size
        (ch, cw), (oh, ow) = self.crop_size, self.out_size
        return min(h, math.ceil(h * oh / ch)), min(w, math.ceil(w * ow / cw))

    def map_points(self, xy: np.ndarray) -> np.ndarray:
        """Source-pixel points ``[K, 2]`` (x, y) -> output-pixel points ``[K, 2]``."""
        x0, y0, _, _ = self.crop
        (ch, cw), (oh, ow) = self.crop_size, self.out_size
        out = np.empty_like(xy, dtype=np.float64)
        out[:, 0] = (xy[:, 0] - x0) * (ow / cw)
        out[:, 1] = (xy[:, 1] - y0) * (oh / ch)
        if self.flip:
            out[:, 0] = ow - out[:, 0]
        return out


class ValTransform:
    """Validation: the whole image resized to the model resolution (source size kept by the dataset)."""

    def plan(
        self, source_size: tuple[int, int], out_size: tuple[int, int], rng: np.random.Generator
    ) -> GeometricPlan:
        h, w = source_size
        return GeometricPlan((0, 0, w, h), False, tuple(out_size))


class TrainTransform:
    """Upstream's default training recipe (flip; square resize or shortest-side resize + random crop).

    Args:
        flip_p: probability of a horizontal flip.
        crop_p: probability of the shortest-side resize + random crop branch (else a plain resize).
        short_sides: candidate shortest sides (px) of the virtual resize before the crop.
        crop_range: (min, max) crop side in px of the virtually resized image, per axis.
    """

    def __init__(
        self,
        flip_p: float = 0.5,
        crop_p: float = 0.5,
        short_sides: Sequence[int] = (400, 500, 600),
        crop_range: tuple[int, int] = (384, 600),
    ):
        self.flip_p = float(flip_p)
        self.crop_p = float(crop_p)
        self.short_sides = tuple(int(s) for s in short_sides)
        self.crop_range = (int(crop_range[0]), int(crop_range[1]))

    def plan(
        self, source_size: tuple[int, int], out_size: tuple[int, int], rng: np.random.Generator
    ) -> GeometricPlan:
        h, w = source_size
        flip = bool(rng.random() < self.flip_p)
        if rng.random() >= self.crop_p:
            return GeometricPlan((0, 0, w, h), flip, tuple(out_size))
        scale = self.short_sides[int(rng.integers(len(self.short_sides)))] / min(h, w)
        vh, vw = h * scale, w * scale  # virtual resized size
        lo, hi = self.crop_range
        # crop sides in the virtual image, as upstream draws them (each in [lo, min(side, hi)])
        cw = rng.uniform(min(lo, vw), min(vw, hi))
        ch = rng.uniform(min(lo, vh), min(vh, hi))
        cw_src = int(np.clip(round(cw / scale), 1, w))
        ch_src = int(np.clip(round(ch / scale), 1, h))
        x0 = int(rng.integers(0, w - cw_src + 1))
        y0 = int(rng.integers(0, h - ch_src + 1))
        return GeometricPlan((x0, y0, x0 + cw_src, y0 + ch_src), flip, tuple(out_size))


def multi_scale_sizes(
    resolution: int | tuple[int, int], size_multiple: int, steps: int = 5
) -> list[tuple[int, int]]:
    """Upstream's multi-scale set: ``steps`` multiples of ``size_multiple`` below and above the resolution.

    Returns (H, W) sizes, smallest first; a non-square resolution moves both sides by the same offset.
    Seg-medium (432, multiple 24) gives 312, 336, ..., 552 (``rfdetr-upstream.md`` section 5.1).
    """
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    out = []
    for k in range(-steps, steps + 1):
        sh, sw = h + k * size_multiple, w + k * size_multiple
        if sh > 0 and sw > 0:
            out.append((sh, sw))
    return out
