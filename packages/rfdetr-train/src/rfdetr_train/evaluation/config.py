"""Evaluation section of the rfdetr-train configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from rfdetr_train.config_base import ConfigSection


class EvalConfig(ConfigSection):
    """Evaluation settings and report writers.

    ``max_dets`` is both the number of detections kept per image after the top-k over queries x slots and
    the largest COCO ``maxDets`` (``[1, 10, max_dets]``; the recall key is ``AR{max_dets}``).
    """

    max_dets: int = Field(100, ge=1, description="detections kept per image (COCO maxDets[-1])")
    backend: Literal["fast", "pycocotools"] = Field(
        "fast", description="COCOeval implementation: our vectorised one or pycocotools (the reference)"
    )
    boundary: bool = Field(
        False, description="also compute Boundary AP during training validation (one erosion per mask)"
    )
    boundary_dilation_ratio: float = Field(
        0.02, gt=0, le=1, description="boundary width as a fraction of the image diagonal (Cheng et al. 2021)"
    )
    mask_threshold: float = Field(0.0, description="mask logit threshold (upstream: logit > 0)")
    mask_chunk_pixels: int = Field(
        1 << 23, ge=1 << 16, description="pixel budget of one chunk of upsampled masks (bounds peak memory)"
    )
    per_class: Literal["every", "last", "never"] = Field(
        "every",
        description="when the per-class tables are printed: after every validation, after the last one, or "
        "never (the per_class_*.csv files are written either way)",
    )
    confusion_iou: float = Field(0.5, gt=0, le=1, description="IoU of a match in the confusion matrix")
    plots: bool = Field(True, description="write confusion matrix, PR and F1-confidence PNGs")
    gallery_images: int = Field(8, ge=0, description="validation images drawn in the gallery (0: none)")

    @field_validator("per_class", mode="before")
    @classmethod
    def _per_class_bool(cls, value):
        """``true``/``false`` (config files of 0.1.0) mean ``every``/``never``."""
        if isinstance(value, bool):
            return "every" if value else "never"
        return value
