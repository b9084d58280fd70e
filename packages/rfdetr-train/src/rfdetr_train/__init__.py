"""rfdetr-train: datasets, losses, the Accelerate-driven training engine and COCO evaluation for RF-DETR-Seg.

Python API (imported lazily, so ``import rfdetr_train`` stays light)::

    import rfdetr_train

    result = rfdetr_train.train()                                   # the CPU demo: seg-tiny, synthetic data
    result = rfdetr_train.train(data="./my_coco", model="seg-nano", weights="seg-nano", epochs=20)
    result.best_weights                                              # runs/train/best.safetensors
    report = rfdetr_train.val(weights=result.best_weights, data="./my_coco", split="test")

The same options as ``python -m rfdetr_train`` (snake_case), see :func:`rfdetr_train.engine.api.train`.
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__", "train", "val"]


def __getattr__(name: str):
    if name == "train":
        from rfdetr_train.engine.api import train

        return train
    if name == "val":
        from rfdetr_train.engine.evaluate_weights import val

        return val
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
