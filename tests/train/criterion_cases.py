"""Random SetCriterion inputs shared by the criterion tests: every output layer of a model and the targets.

The draws happen in a fixed order (per layer: class logits, box centres, box sizes, mask tensors; then per
image: labels, box centres, box sizes, masks). ``logits_first=False`` draws the box centres and sizes before
the logits: the order test_criterion_layer_batch.py was written with, whose seeded cases it keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def layer_outputs(
    b: int,
    g: torch.Generator,
    *,
    slots: int,
    queries: int,
    channels: int,
    mask_hw: tuple[int, int],
    dense: bool = False,
    logits_first: bool = True,
) -> dict:
    """One output layer: ``pred_logits [b, queries, slots]``, ``pred_boxes [b, queries, 4]`` (cxcywh inside the
    image) and ``pred_masks``: lazy (``spatial_features [b, channels, h, w]``, ``query_features [b, queries,
    channels]``, ``bias [1]``) or, with ``dense``, logits ``[b, queries, h, w]``."""
    logits = torch.randn(b, queries, slots, generator=g) if logits_first else None
    boxes = torch.cat(
        [
            torch.rand(b, queries, 2, generator=g) * 0.6 + 0.2,
            torch.rand(b, queries, 2, generator=g) * 0.3 + 0.05,
        ],
        -1,
    )
    if logits is None:
        logits = torch.randn(b, queries, slots, generator=g)
    out = {"pred_logits": logits, "pred_boxes": boxes}
    if dense:
        out["pred_masks"] = torch.randn(b, queries, *mask_hw, generator=g)
    else:
        out["pred_masks"] = {
            "spatial_features": torch.randn(b, channels, *mask_hw, generator=g),
            "query_features": torch.randn(b, queries, channels, generator=g),
            "bias": torch.randn(1, generator=g),
        }
    return out


def criterion_case(
    sizes: Sequence[int],
    seed: int,
    *,
    slots: int,
    queries: int,
    channels: int,
    aux: int,
    mask_hw: tuple[int, int],
    gt_hw: Callable[[int], tuple[int, int]],
    dense: bool = False,
    logits_first: bool = True,
) -> tuple[dict, list[dict]]:
    """Training outputs (final layer, ``aux`` earlier layers, ``enc_outputs``) for ``len(sizes)`` images and
    their targets: image ``i`` has ``sizes[i]`` objects with labels in ``[0, slots)`` and bool masks of size
    ``gt_hw(i)``."""
    g = torch.Generator().manual_seed(seed)
    b = len(sizes)
    kw = dict(
        slots=slots,
        queries=queries,
        channels=channels,
        mask_hw=mask_hw,
        dense=dense,
        logits_first=logits_first,
    )
    out = layer_outputs(b, g, **kw)
    out["aux_outputs"] = [layer_outputs(b, g, **kw) for _ in range(aux)]
    out["enc_outputs"] = layer_outputs(b, g, **kw)
    targets = []
    for i, n in enumerate(sizes):
        h, w = gt_hw(i)
        targets.append(
            {
                "labels": torch.randint(0, slots, (n,), generator=g),
                "boxes": torch.cat(
                    [torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05],
                    -1,
                ),
                "masks": torch.rand(n, h, w, generator=g) > 0.5,
            }
        )
    return out, targets


def leaves(node):
    """The tensors of a nested output dict / list, in a fixed order (dict keys sorted)."""
    if isinstance(node, dict):
        for key in sorted(node):
            yield from leaves(node[key])
    elif isinstance(node, list):
        for value in node:
            yield from leaves(value)
    else:
        yield node


def to_device(node, device):
    """A nested output dict / list (or a target dict) with every tensor moved to ``device``."""
    if isinstance(node, dict):
        return {k: to_device(v, device) for k, v in node.items()}
    if isinstance(node, list):
        return [to_device(v, device) for v in node]
    return node.to(device)
