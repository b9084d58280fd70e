"""The model card: the one record of how to run a model the way it was trained.

A :class:`ModelCard` travels with the weights everywhere: ``__metadata__["rfdetr"]`` of our checkpoints
(:func:`rfdetr_core.checkpoint.save_model`), ``LoadedModel.card``, ONNX ``metadata_props`` and TensorRT
sidecars (rfdetr-export) and the server's ``GET /model`` (rfdetr-serve). They all carry
:meth:`ModelCard.to_metadata` and read it back with :meth:`ModelCard.from_metadata`; nothing else re-lists
these fields.

The metadata dict (JSON-safe; ``card_version`` 1)::

    {"card_version": 1, "variant": "seg-nano", "num_queries": 100, "num_slots": 91,
     "resolution": [312, 312], "preprocess": {...PreprocessConfig.to_json()...},
     "class_map": {...ClassMap.to_json()...}, "is_segmentation": true, "mask_downsample": 4,
     "mask_size": [78, 78], "num_select": null}

``mask_size`` is derived (``resolution // mask_downsample``) and written only for readers without
rfdetr-core; :meth:`~ModelCard.from_metadata` ignores it. Files written by rfdetr 0.1.0 carry ``variant``,
``num_queries``, ``resolution``, ``preprocess`` and ``class_map`` only; the other fields then come from the
class map (``num_slots``) and the variant registry (``is_segmentation``, ``mask_downsample``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rfdetr_core.class_map import ClassMap
from rfdetr_core.errors import CheckpointError
from rfdetr_core.preprocess import PreprocessConfig

CARD_VERSION = 1


@dataclass(frozen=True)
class ModelCard:
    """What a runtime needs to run a model the way it was trained.

    Attributes:
        variant: registered variant name (``"seg-nano"``); the architecture comes from the registry.
        num_queries: queries ``Q`` of group 0 (the only group used at inference).
        num_slots: class logit slots ``S`` (``pred_logits [B, Q, S]``).
        resolution: model input ``(H, W)``; exported graphs are fixed to it.
        preprocess: resize and normalisation of images (:mod:`rfdetr_core.preprocess`).
        class_map: slot <-> dataset category id <-> name; ``class_map.num_slots == num_slots``.
        is_segmentation: whether the model outputs mask logits.
        mask_downsample: mask logits are at ``resolution // mask_downsample`` (4 for RF-DETR-Seg).
        num_select: (query, slot) pairs kept by post-processing; ``None`` means ``num_queries`` (upstream's
            rule); see :attr:`default_num_select`.
    """

    variant: str
    num_queries: int
    num_slots: int
    resolution: tuple[int, int]
    preprocess: PreprocessConfig
    class_map: ClassMap
    is_segmentation: bool
    mask_downsample: int = 4
    num_select: int | None = None

    def __post_init__(self):
        res = tuple(int(v) for v in self.resolution)
        if len(res) != 2 or min(res) < 1:
            raise ValueError(f"resolution must be (H, W) with positive sizes, got {self.resolution!r}")
        object.__setattr__(self, "resolution", res)
        if self.num_queries < 1 or self.num_slots < 1 or self.mask_downsample < 1:
            raise ValueError(
                f"num_queries ({self.num_queries}), num_slots ({self.num_slots}) and mask_downsample "
                f"({self.mask_downsample}) must be positive"
            )
        if self.class_map.num_slots != self.num_slots:
            raise ValueError(
                f"the class map has {self.class_map.num_slots} slots but the card says num_slots={self.num_slots}"
            )
        if self.num_select is not None and self.num_select < 1:
            raise ValueError(f"num_select must be positive or None, got {self.num_select}")

    @property
    def default_num_select(self) -> int:
        """``num_select``, or ``num_queries`` when unset (upstream's ``PostProcess`` keeps ``Q`` pairs)."""
        return self.num_select if self.num_select is not None else self.num_queries

    @property
    def mask_size(self) -> tuple[int, int] | None:
        """``(h, w)`` of the mask logits (``pred_masks [B, Q, h, w]``), ``None`` for detection models."""
        if not self.is_segmentation:
            return None
        return self.resolution[0] // self.mask_downsample, self.resolution[1] // self.mask_downsample

    def replace(self, **changes) -> ModelCard:
        """A copy with some fields changed (validated again)."""
        from dataclasses import replace

        return replace(self, **changes)

    def to_metadata(self) -> dict[str, Any]:
        """The JSON-safe dict that checkpoints, ONNX metadata, sidecars and ``GET /model`` carry."""
        mask = self.mask_size
        return {
            "card_version": CARD_VERSION,
            "variant": self.variant,
            "num_queries": int(self.num_queries),
            "num_slots": int(self.num_slots),
            "resolution": [self.resolution[0], self.resolution[1]],
            "preprocess": self.preprocess.to_json(),
            "class_map": self.class_map.to_json(),
            "is_segmentation": bool(self.is_segmentation),
            "mask_downsample": int(self.mask_downsample),
            "mask_size": list(mask) if mask is not None else None,
            "num_select": None if self.num_select is None else int(self.num_select),
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> ModelCard:
        """Read a card back from :meth:`to_metadata`'s dict, or from a checkpoint written by rfdetr 0.1.0.

        Keys that are not card fields (a checkpoint's ``step``, ``metrics``, ...) are ignored. Raises
        :class:`~rfdetr_core.errors.CheckpointError` naming a missing or malformed key.
        """
        version = meta.get("card_version", 0)
        if not isinstance(version, int) or version > CARD_VERSION:
            raise CheckpointError(
                f"model card version {version!r} is newer than this rfdetr-core understands ({CARD_VERSION}); "
                "upgrade rfdetr-core."
            )
        missing = [k for k in ("variant", "num_queries", "resolution", "class_map") if meta.get(k) is None]
        if missing:
            raise CheckpointError(f"the model card is missing {', '.join(missing)}: {sorted(meta)}")
        try:
            class_map = ClassMap.from_json(meta["class_map"])
            variant = str(meta["variant"])
            is_seg, downsample = meta.get("is_segmentation"), meta.get("mask_downsample")
            if is_seg is None or downsample is None:  # 0.1.0 files: from the registry
                from rfdetr_core.variants import get_variant

                v = get_variant(variant)
                is_seg = v.is_segmentation if is_seg is None else is_seg
                downsample = v.mask_downsample_ratio if downsample is None else downsample
            res = meta["resolution"]
            return cls(
                variant=variant,
                num_queries=int(meta["num_queries"]),
                num_slots=int(meta.get("num_slots", class_map.num_slots)),
                resolution=(int(res[0]), int(res[1])),
                preprocess=PreprocessConfig.from_json(meta.get("preprocess")),
                class_map=class_map,
                is_segmentation=bool(is_seg),
                mask_downsample=int(downsample),
                num_select=None if meta.get("num_select") is None else int(meta["num_select"]),
            )
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise CheckpointError(f"malformed model card: {exc}") from exc
