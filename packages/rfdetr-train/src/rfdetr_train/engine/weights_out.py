"""``last.safetensors`` / ``best.safetensors``: model weights in our checkpoint format.

The metadata carries what :func:`rfdetr_core.factory.load_model` and ``RFDETR.from_checkpoint`` need to
rebuild and run the model the way it was trained: variant, resolution, preprocessing, class map and query
count; plus the step, epoch and metrics for the record. All DETR groups are kept (fine-tuning needs them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rfdetr_core.checkpoint import save_checkpoint
from rfdetr_core.class_map import ClassMap
from rfdetr_core.preprocess import PreprocessConfig
from rfdetr_core.variants import Variant


def weights_metadata(
    variant: Variant,
    resolution: tuple[int, int],
    preprocess: PreprocessConfig,
    class_map: ClassMap,
    **extra,
) -> dict:
    return {
        "variant": variant.name,
        "num_queries": variant.num_queries,
        "resolution": [int(resolution[0]), int(resolution[1])],
        "preprocess": preprocess.to_json(),
        "class_map": class_map.to_json(),
        **extra,
    }


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write one weights file atomically (tied tensors are cloned apart by ``save_checkpoint``)."""
    return save_checkpoint(path, state_dict, metadata)
