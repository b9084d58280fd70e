"""Optimiser parameter groups with layer-wise learning-rate decay, and the AdamW that takes them.

The fine-tuning recipe follows upstream RF-DETR (``rfdetr-upstream.md`` section 5.1, from LW-DETR):

* a backbone-encoder parameter gets ``lr_encoder * layer_decay ** (N + 1 - layer_id) * component_decay ** 2``
  with ``N = max(out_feature_indexes) + 1``, ``layer_id = block index + 1`` (the patch/position embeddings
  are layer 0, anything after the last block, e.g. the final LayerNorm, is layer ``N + 1``);
* a decoder parameter gets ``lr * component_decay``;
* everything else (projector, heads, query embeddings, two-stage heads, mask head) gets ``lr``.

Weight decay is 0 for norms, biases, embeddings, position tables and layer-scales everywhere (upstream
applies that rule to the backbone only; with decay 1e-4 the difference is small, and decaying a LayerNorm
gain towards 0 is never wanted). Parameters with identical hyper-parameters share one group, so fused /
foreach AdamW runs one multi-tensor kernel per group.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# Where parameters live in rfdetr_core.models.RFDETRModel (the projector is outside the backbone).
BACKBONE_ENCODER_PREFIX = "backbone."
DECODER_PREFIX = "decoder."
_LAYER0_NAMES = ("embeddings", "pos_embed", "patch_embed", "cls_token", "mask_token", "register_tokens")
_BLOCK_RE = re.compile(r"\.(?:layer|layers|blocks)\.(\d+)\.")
# Substrings naming parameters that must not be decayed (upstream's list plus the token tables).
_NO_DECAY_NAMES = (
    "gamma",
    "pos_embed",
    "patch_embed",
    "rel_pos",
    "bias",
    "norm",
    "embeddings",
    "cls_token",
    "mask_token",
)
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.Embedding)


@dataclass(frozen=True)
class OptimSettings:
    """Learning-rate and weight-decay numbers of a recipe."""

    lr: float
    lr_encoder: float
    layer_decay: float
    component_decay: float
    weight_decay: float


def backbone_layer_id(name: str, num_layers: int) -> int:
    """Layer index used for layer-wise decay: 0 for embeddings, block + 1 for blocks, ``num_layers + 1`` after.

    ``name`` is relative to the backbone encoder (or a full name; only its block number matters).
    """
    if any(tok in name for tok in _LAYER0_NAMES):
        return 0
    match = _BLOCK_RE.search("." + name)
    if match is not None:
        return int(match.group(1)) + 1
    return num_layers + 1


def _no_decay_param_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            for p_name, _ in module.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    for name, param in model.named_parameters():
        if param.ndim <= 1 or any(tok in name for tok in _NO_DECAY_NAMES):
            names.add(name)
    return names


def param_groups(
    model: nn.Module,
    settings: OptimSettings,
    num_layers: int,
    *,
    backbone_prefix: str = BACKBONE_ENCODER_PREFIX,
    decoder_prefix: str = DECODER_PREFIX,
) -> list[dict]:
    """Optimiser groups for the trainable parameters of ``model``.

    Args:
        model: the detector (not wrapped by DDP).
        settings: learning rates and decays.
        num_layers: ``N = max(out_feature_indexes) + 1`` of the variant.

    Returns:
        ``[{"params": [...], "lr": float, "weight_decay": float, "name": str}, ...]``; each group also keeps
        its own ``base_lr`` that schedules multiply.
    """
    no_decay = _no_decay_param_names(model)
    merged: dict[tuple[str, float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(backbone_prefix):
            layer_id = backbone_layer_id(name[len(backbone_prefix) :], num_layers)
            lr = (
                settings.lr_encoder
                * settings.layer_decay ** (num_layers + 1 - layer_id)
                * settings.component_decay**2
            )
            kind = "backbone"
        elif name.startswith(decoder_prefix):
            lr, kind = settings.lr * settings.component_decay, "decoder"
        else:
            lr, kind = settings.lr, "other"
        wd = 0.0 if name in no_decay else settings.weight_decay
        merged.setdefault((kind, lr, wd), []).append(param)
    groups = []
    for (kind, lr, wd), params in merged.items():
        groups.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": wd, "name": kind})
    return groups


def build_optimizer(groups: Iterable[dict], device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups``: the fused kernel on CUDA (one launch per group) and on CPU (seg-tiny on 2 cores:
    2.3 ms per step instead of 9.6 ms for foreach, same results to 1e-9), foreach elsewhere."""
    groups = list(groups)
    if not groups:
        from rfdetr_core.errors import RFDETRError

        raise RFDETRError("The model has no trainable parameters; nothing to optimise.")
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], fused=fused or None, foreach=None if fused else True)
