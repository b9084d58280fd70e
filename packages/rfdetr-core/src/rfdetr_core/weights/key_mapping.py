"""Renaming another project's state-dict keys to ours, shared by the upstream and DINOv2 converters."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from rfdetr_core.errors import CheckpointError

Rule = tuple[re.Pattern[str], str]


def rename_keys(
    sd: Mapping[str, Tensor],
    rules: Sequence[Rule],
    *,
    dropped: re.Pattern[str],
    qkv: re.Pattern[str] | None,
    qkv_target: str,
    label: str,
) -> tuple[dict[str, Tensor], list[str]]:
    """Map ``sd`` onto our names; returns ``(renamed, unknown_keys)``.

    Keys matching ``dropped`` are skipped. Separate query/key/value projections matching ``qkv`` (groups:
    block index, ``query|key|value``, ``weight|bias``) are concatenated into our fused qkv tensor named
    ``qkv_target.format(block=..., kind=...)``: ``[3C, C]`` weights / ``[3C]`` biases. Every other key takes
    the first rule whose pattern matches (``pattern.sub(replacement, key)``); keys no rule matches are
    returned as unknown. ``label`` names the blocks in the error for an incomplete q/k/v triple.
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    parts_by_block: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        if dropped.match(key):
            continue
        if qkv is not None and (m := qkv.match(key)):
            parts_by_block.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
            continue
        for rx, repl in rules:
            if rx.match(key):
                out[rx.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    for (block, kind), parts in parts_by_block.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"{label} {block}: incomplete query/key/value {kind} tensors")
        out[qkv_target.format(block=block, kind=kind)] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    return out, unknown
