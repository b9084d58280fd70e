"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021), pure-PyTorch path.

This is the reference implementation behind ``torch.ops.rfdetr.ms_deform_attn``; the CUDA kernel built from
``csrc/`` must match it. Sampling is bilinear with zero padding outside the map and ``align_corners=False``
(pixel centres at ``(i + 0.5) / size``), as upstream RF-DETR does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def level_shapes(spatial_shapes: list[int]) -> list[tuple[int, int]]:
    """``[H0, W0, H1, W1, ...]`` -> ``[(H0, W0), (H1, W1), ...]``."""
    if len(spatial_shapes) % 2:
        raise ValueError(f"spatial_shapes must hold (H, W) pairs, got {len(spatial_shapes)} numbers")
    return list(zip(spatial_shapes[0::2], spatial_shapes[1::2], strict=True))


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable attention over several feature levels.

    Args:
        value: ``[B, S, M, D]`` per-head values of all levels, flattened row-major and concatenated
            (``S = sum(H_l * W_l)``), ``M`` heads of ``D`` channels.
        spatial_shapes: flat ``[H_0, W_0, H_1, W_1, ...]`` of the ``L`` levels.
        sampling_locations: ``[B, Q, M, L, P, 2]`` (x, y) in [0, 1] image coordinates; points outside
            the map read zeros.
        attention_weights: ``[B, Q, M, L, P]`` weights (already normalised by the caller).

    Returns:
        ``[B, Q, M * D]``.
    """
    shapes = level_shapes(spatial_shapes)
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if levels != len(shapes):
        raise ValueError(f"sampling_locations has {levels} levels but spatial_shapes has {len(shapes)}")
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # [B, HW, M, D] -> [B*M, D, H, W]
        v = values[lvl].flatten(2).transpose(1, 2).reshape(batch * heads, dim, h, w)
        # [B, Q, M, P, 2] -> [B*M, Q, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # -> [B*M, D, Q, P]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B, Q, M, L, P] -> [B*M, 1, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    # [B*M, D, Q, L, P] -> [B*M, D, Q, L*P] -> weighted sum -> [B*M, D, Q]
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    # [B*M, D, Q] -> [B, M*D, Q] -> [B, Q, M*D]
    return out.view(batch, heads * dim, queries).transpose(1, 2).contiguous()
