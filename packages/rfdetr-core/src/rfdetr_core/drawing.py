"""Drawing detections on an image: translucent masks, boxes and ``name score`` labels (PIL only)."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from rfdetr_core.errors import ImageError
from rfdetr_core.preprocess import load_image


class DrawableDetections(Protocol):
    """What :func:`draw_detections` reads (a :class:`~rfdetr_core.detections.Detections` has it all).

    ``N`` detections of one ``image_size = (H, W)`` image: ``boxes [N, 4]`` xyxy pixels, ``scores [N]``,
    ``category_ids [N]``, ``class_names`` (N strings), ``masks`` ``[N, H, W]`` bool or ``None``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    class_names: list[str]
    masks: np.ndarray | None
    image_size: tuple[int, int]

    def __len__(self) -> int: ...


# A fixed, colour-blind-friendly cycle (Okabe-Ito plus extras) so one class keeps its colour across images.
_PALETTE = np.array(
    [
        (230, 159, 0),
        (86, 180, 233),
        (0, 158, 115),
        (240, 228, 66),
        (0, 114, 178),
        (213, 94, 0),
        (204, 121, 167),
        (120, 94, 240),
        (255, 99, 132),
        (60, 180, 75),
    ],
    dtype=np.uint8,
)
MASK_ALPHA = 0.45


def class_color(category_id: int) -> tuple[int, int, int]:
    """The colour of one category id."""
    return tuple(int(c) for c in _PALETTE[int(category_id) % len(_PALETTE)])


def _to_uint8_rgb(image: Any) -> np.ndarray:
    """Any image input -> ``[H, W, 3]`` uint8 RGB."""
    t, _ = load_image(image)  # [3, H, W] float in [0, 1]
    return t.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # [H, W, 3]


def draw_detections(
    image: Any, detections: DrawableDetections, show_masks: bool = True, show_labels: bool = True
):
    """Draw ``detections`` on ``image`` and return a new PIL RGB image."""
    from PIL import Image, ImageDraw, ImageFont

    rgb = _to_uint8_rgb(image)
    if rgb.shape[:2] != tuple(detections.image_size):
        raise ImageError(
            f"The image is {rgb.shape[1]}x{rgb.shape[0]} but the detections are for a "
            f"{detections.image_size[1]}x{detections.image_size[0]} image."
        )
    if show_masks and detections.masks is not None and len(detections):
        canvas = rgb.astype(np.float32)
        # lowest score first, so the best detection ends on top
        for i in reversed(range(len(detections))):
            m = detections.masks[i]
            color = np.asarray(class_color(detections.category_ids[i]), dtype=np.float32)
            canvas[m] = canvas[m] * (1.0 - MASK_ALPHA) + color * MASK_ALPHA
        rgb = canvas.round().clip(0, 255).astype(np.uint8)
    out = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(out)
    line, font_px = line_and_font_size(detections.image_size)
    font = _font(ImageFont, font_px)
    placed: list[tuple[float, float, float, float]] = []  # label rectangles already drawn
    for i in reversed(range(len(detections))):
        color = class_color(detections.category_ids[i])
        x0, y0, x1, y1 = (float(v) for v in detections.boxes[i])
        draw.rectangle((x0, y0, x1, y1), outline=color, width=line)
    if show_labels:
        # best detection first, so its label gets the first choice of place
        for i in range(len(detections)):
            color = class_color(detections.category_ids[i])
            text = f"{detections.class_names[i]} {detections.scores[i]:.2f}"
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            w, h = right - left + 2 * line + 2, bottom - top + 2 * line
            rect = _label_place(detections.boxes[i], (w, h), detections.image_size, placed)
            placed.append(rect)
            draw.rectangle(rect, fill=color)
            draw.text((rect[0] + line + 1 - left, rect[1] + line - top), text, fill=(0, 0, 0), font=font)
    return out


def line_and_font_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """Box line width and label font height in pixels for an image of ``(H, W)``: both grow with the longer
    side (2 px / 11 px at 640, 10 px / 43 px at 3840), so labels stay readable when a large photo is
    shown scaled down."""
    longest = max(int(image_size[0]), int(image_size[1]))
    return max(1, round(longest / 400)), max(11, round(longest / 90))


def _font(image_font, size: int):
    try:
        return image_font.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError, ImportError):
        return image_font.load_default()


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _label_place(box, size: tuple[int, int], image_size: tuple[int, int], placed) -> tuple[float, ...]:
    """Where a ``size = (w, h)`` label of ``box`` (xyxy) goes: above the box's top-left corner, else inside
    it below the corner, else stacked further down or up until it overlaps no label already ``placed``;
    always kept inside the image."""
    height, width = int(image_size[0]), int(image_size[1])
    w, h = size
    x0 = min(max(0.0, float(box[0])), max(0.0, width - w))
    top = float(box[1])
    candidates = [top - h, top]
    for k in range(1, 8):  # then alternately further down and further up
        candidates += [top + k * h, top - (k + 1) * h]
    rect = None
    for y in candidates:
        y = min(max(0.0, y), max(0.0, height - h))
        rect = (x0, y, x0 + w, y + h)
        if not any(_overlaps(rect, other) for other in placed):
            return rect
    return rect  # crowded: the last candidate (may overlap)
