"""Backbone initialisation from Meta DINOv2 weights (Oquab et al., arXiv 2304.07193).

Two layouts are read: the torch.hub files (``dinov2_vits14`` / ``dinov2_vitb14``: ``blocks.{i}.attn.qkv``,
``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.ls1.gamma``, ...) and Hugging Face ``facebook/dinov2-*``
(``embeddings.*``, ``encoder.layer.{i}.attention.attention.query``, ...; an optional ``dinov2.`` prefix).

Patch size: DINOv2 uses 14 pixels; most variants use 12, 16 or 20. The patch kernel is resized with FlexiViT's
pseudo-inverse resize (Beyer et al., "FlexiViT", CVPR 2023), which keeps each token's embedding of a resized
patch equal to the original embedding of the original patch (exact when enlarging, least-squares when
shrinking). The position table is bicubically resized to the model's grid, as upstream does.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_core.errors import CheckpointError
from rfdetr_core.models.backbone import resize_patch_pos_embed
from rfdetr_core.models.spec import ModelSpec
from rfdetr_core.weights.key_mapping import rename_keys

_HUB = [
    (r"^cls_token$", "cls_token"),
    (r"^pos_embed$", "pos_embed"),
    (r"^patch_embed\.proj\.(weight|bias)$", r"patch_embed.\1"),
    (r"^blocks\.(\d+)\.norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^blocks\.(\d+)\.ls([12])\.gamma$", r"blocks.\1.ls\2"),
    (r"^blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
    (r"^norm\.(weight|bias)$", r"norm.\1"),
]
_HF = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.\1"),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
    (r"^layernorm\.(weight|bias)$", r"norm.\1"),
]
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
# Entries with no counterpart in our backbone: masked-image-modelling token, registers (none of our variants
# uses them), SwiGLU/classifier heads are reported instead.
_DROPPED = re.compile(r"^(mask_token|embeddings\.mask_token|register_tokens|embeddings\.register_tokens)$")


def resize_patch_kernel(weight: Tensor, size: int) -> Tensor:
    """Resize a ``[C, 3, p, p]`` patch-embedding kernel to ``[C, 3, size, size]`` (FlexiViT PI-resize).

    With ``B`` the bilinear resize matrix (``size^2 x p^2``), the new kernel is ``pinv(B^T) w``, so that
    ``<B x, w_new> = <x, w>`` for every patch ``x``.
    """
    p = weight.shape[-1]
    if p == size:
        return weight
    eye = torch.eye(p * p, dtype=torch.float64).view(p * p, 1, p, p)
    # Column j of B is the bilinear resize of the j-th basis patch: [p*p, 1, size, size] -> [size^2, p^2]
    basis = F.interpolate(eye, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    resize = basis.reshape(p * p, size * size).T
    pinv = torch.linalg.pinv(resize.T)  # [size^2, p^2]
    # [C, 3, p, p] -> [C*3, p^2] -> [C*3, size^2] -> [C, 3, size, size]
    flat = weight.double().reshape(-1, p * p) @ pinv.T
    return flat.reshape(*weight.shape[:2], size, size).to(weight.dtype)


def _normalise(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in ("dinov2.", "backbone.", "model.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def convert_dinov2_state_dict(sd: dict[str, Tensor], spec: ModelSpec) -> tuple[dict[str, Tensor], list[str]]:
    """Map DINOv2 weights onto the backbone of an ``RFDETRModel(spec)``.

    Args:
        sd: a torch.hub or Hugging Face DINOv2 state dict (ViT-S/14 or ViT-B/14, without registers).
        spec: the target architecture (``model.spec``, or :func:`rfdetr_core.factory.model_spec`).

    Returns:
        ``(backbone_state_dict, notes)``: keys relative to ``model.backbone`` (load with
        ``model.backbone.load_state_dict(sd, strict=False)``; everything after the backbone stays freshly
        initialised) and notes on resizing and ignored entries.

    Raises:
        CheckpointError: not a DINOv2 state dict, or its width or depth does not fit the model's encoder.
    """
    sd = _normalise(dict(sd))
    if "cls_token" in sd:
        rules = _HUB
    elif "embeddings.cls_token" in sd:
        rules = _HF
    else:
        raise CheckpointError(
            "This does not look like a DINOv2 state dict (no 'cls_token' or 'embeddings.cls_token'). Pass a "
            "torch.hub dinov2_vit*14 file or a Hugging Face facebook/dinov2-* model file."
        )
    out, unknown = rename_keys(
        sd,
        [(re.compile(rx), repl) for rx, repl in rules],
        dropped=_DROPPED,
        qkv=_HF_QKV if rules is _HF else None,
        qkv_target="blocks.{block}.attn.qkv.{kind}",
        label="DINOv2 block",
    )

    width = out["cls_token"].shape[-1]
    if width != spec.encoder_dim:
        raise CheckpointError(
            f"These DINOv2 weights are {width} wide; the {spec.name!r} encoder is {spec.encoder_dim} wide "
            f"({'ViT-S' if spec.encoder_dim == 384 else 'ViT-B' if spec.encoder_dim == 768 else 'custom'}). Use "
            f"{'dinov2_vits14' if spec.encoder_dim == 384 else 'dinov2_vitb14' if spec.encoder_dim == 768 else 'no DINOv2 file'}."
        )
    depth = len({int(k.split(".")[1]) for k in out if k.startswith("blocks.")})
    built = spec.encoder_blocks
    if depth < built:
        raise CheckpointError(f"These DINOv2 weights have {depth} blocks; the encoder needs {built}.")
    # Blocks past the last stage the model reads are never run.
    out = {k: v for k, v in out.items() if not (k.startswith("blocks.") and int(k.split(".")[1]) >= built)}

    notes: list[str] = []
    kernel = out["patch_embed.weight"]
    if kernel.shape[-1] != spec.patch_size:
        out["patch_embed.weight"] = resize_patch_kernel(kernel, spec.patch_size)
        notes.append(f"patch kernel resized from {kernel.shape[-1]} to {spec.patch_size} pixels (FlexiViT)")
    table = out["pos_embed"]
    grid = spec.positional_encoding_size
    if table.shape[1] != 1 + grid * grid:
        out["pos_embed"] = resize_patch_pos_embed(table, (grid, grid))
        side = round((table.shape[1] - 1) ** 0.5)
        notes.append(f"position table resized from {side}x{side} to {grid}x{grid} patches")
    if unknown:
        notes.append(
            f"ignored {len(unknown)} entries with no place in the backbone: {', '.join(unknown[:8])}"
        )
    return out, notes
