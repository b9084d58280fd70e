"""COCO segmentations (polygons, uncompressed and compressed RLE) -> masks, one instance at a time.

Nothing here decodes a whole dataset: callers rasterise the instances of one sample, at the size they need.
Polygons can be transformed (scaled, shifted, flipped) before rasterising, which is exact and cheap; RLE is
decoded at the size it was written for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rle_counts_from_string(s: str) -> list[int]:
    """Decode COCO's compressed RLE string into run lengths (raises ``ValueError`` on malformed input).

    Format (COCO mask API): each run is a little-endian base-32 number, 5 bits per character offset by 48,
    bit 0x20 meaning "more characters follow", bit 0x10 of the last character the sign; from the third
    run on, the value is stored as a difference to the run two places before.
    """
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("truncated RLE string")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid RLE character {s[p]!r} at {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_problem(rle: dict, height: int, width: int) -> str | None:
    """Why an RLE dict is unusable for an image of ``height x width`` (``None`` if it is fine)."""
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        return "an RLE needs 'size' [h, w] and 'counts'"
    size = rle["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        return f"RLE 'size' must be [height, width], got {size!r}"
    if [int(size[0]), int(size[1])] != [int(height), int(width)]:
        return f"RLE size {list(size)} does not match the image size [{height}, {width}]"
    counts = rle["counts"]
    if isinstance(counts, (bytes, str)):
        try:
            runs = rle_counts_from_string(counts.decode("ascii") if isinstance(counts, bytes) else counts)
        except (ValueError, UnicodeDecodeError) as exc:
            return f"compressed RLE does not decode ({exc})"
    elif isinstance(counts, list):
        runs = counts
        if not all(isinstance(c, (int, np.integer)) for c in runs):
            return "uncompressed RLE counts must be integers"
    else:
        return f"RLE 'counts' must be a string or a list, got {type(counts).__name__}"
    if any(r < 0 for r in runs):
        return "RLE has negative run lengths"
    total = sum(runs)
    if total != height * width:
        return f"RLE covers {total} pixels, the image has {height}x{width} = {height * width}"
    return None


def to_rle(segmentation, height: int, width: int) -> dict:
    """Any valid COCO segmentation -> one compressed RLE dict at ``height x width`` (parts merged)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects([list(map(float, p)) for p in segmentation], height, width)
        return mask_utils.merge(rles)
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    seg = dict(segmentation)
    if isinstance(seg["counts"], str):
        seg["counts"] = seg["counts"].encode("ascii")
    return seg


def mask_area(segmentation, height: int, width: int) -> int:
    """Pixel count of a (validated) segmentation, without decoding it densely."""
    from pycocotools import mask as mask_utils

    return int(mask_utils.area(to_rle(segmentation, height, width)))


def decode(segmentation, height: int, width: int) -> np.ndarray:
    """A (validated) segmentation -> bool mask ``[height, width]``."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(to_rle(segmentation, height, width)).astype(bool)


def rasterize_polygons(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Polygons (each ``[K, 2]`` x, y in output pixels) of one instance -> bool mask ``[height, width]``."""
    from pycocotools import mask as mask_utils

    parts = [p.reshape(-1).astype(np.float64).tolist() for p in polygons if len(p) >= 3]
    if not parts:
        return np.zeros((height, width), dtype=bool)
    rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
    return mask_utils.decode(rle).astype(bool)
