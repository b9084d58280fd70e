"""Drawing detections on an image: translucent masks, boxes and ``name score`` labels (PIL only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rfdetr_core.errors import ImageError
from rfdetr_core.preprocess import load_image

if TYPE_CHECKING:
    from rfdetr_core.detections import Detections

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


def draw_detections(image: Any, detections: Detections, show_masks: bool = True, show_labels: bool = True):
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
    font = ImageFont.load_default()
    width = max(1, round(max(detections.image_size) / 400))
    for i in reversed(range(len(detections))):
        color = class_color(detections.category_ids[i])
        x0, y0, x1, y1 = (float(v) for v in detections.boxes[i])
        draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
        if show_labels:
            text = f"{detections.class_names[i]} {detections.scores[i]:.2f}"
            left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
            lift = bottom - top + 2
            ty = y0 - lift if y0 - lift >= 0 else y0
            draw.rectangle((x0, ty, x0 + right - left + 4, ty + lift), fill=color)
            draw.text((x0 + 2, ty + 1), text, fill=(0, 0, 0), font=font)
    return out
