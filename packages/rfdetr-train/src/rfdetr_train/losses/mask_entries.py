"""The ``pred_masks`` entry of a training output layer, as the matcher and the criterion read it.

An entry is either dense mask logits ``[B, GQ, h, w]`` or lazy (what the model gives in training, see
``rfdetr_core.models.mask_head.MaskHead.lazy``): ``{"spatial_features": [B, C, h, w], "query_features":
[B, GQ, C], "bias": [B, GQ] or [1]}`` whose logits are ``einsum("c,chw->hw", query_features[b, q],
spatial_features[b]) + bias[b, q]`` (a ``[1]`` bias is one scalar for every query, as upstream's lazy entries
and hand-made test entries have it). Lazy entries let the losses form logits for matched pairs only.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

LAZY_KEYS = ("spatial_features", "query_features", "bias")


def reference(entry: Any) -> Tensor:
    """The tensor that fixes the batch size, mask size and device of a dense or lazy entry."""
    return entry if isinstance(entry, Tensor) else entry["spatial_features"]


def query_count(entry: Any) -> int:
    """``GQ`` of a dense or lazy entry."""
    return entry.shape[1] if isinstance(entry, Tensor) else entry["query_features"].shape[1]


def query_bias(entry: dict[str, Tensor]) -> Tensor:
    """The bias of every query of a lazy entry: ``[B, GQ]`` (a view when the entry's bias is one scalar)."""
    batch, queries = entry["query_features"].shape[:2]
    return entry["bias"].expand(batch, queries)


def signature(entry: Any) -> tuple | None:
    """Shapes that decide whether entries can be stacked (dtypes may differ: everything is cast first)."""
    if isinstance(entry, Tensor):
        return ("dense", tuple(entry.shape))
    if isinstance(entry, dict):
        return ("lazy",) + tuple(tuple(entry[k].shape) for k in LAZY_KEYS)
    return None
