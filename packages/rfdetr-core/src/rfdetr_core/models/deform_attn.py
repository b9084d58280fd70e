"""Multi-scale deformable attention module (Zhu et al., "Deformable DETR", ICLR 2021).

The sampling itself runs only through ``torch.ops.rfdetr.ms_deform_attn`` (registered by ``rfdetr_core.ops``
when the package is imported), so the CUDA kernel and the pure-PyTorch path are interchangeable.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class MSDeformAttn(nn.Module):
    """Deformable cross-attention of ``queries`` to a flattened multi-level ``memory`` around reference boxes.

    Args:
        dim: model width; heads: attention heads (``dim / heads`` channels each); levels: feature levels;
        points: sampling points per head and level.
    """

    def __init__(self, dim: int, heads: int, levels: int, points: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} deformable-attention heads")
        self.dim, self.heads, self.levels, self.points = dim, heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR init: offsets start on a per-head ring (radius = point index + 1), uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        ring = torch.stack([theta.cos(), theta.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True).values
        # [heads, 2] -> [heads, levels, points, 2], point p scaled by p + 1
        grid = ring[:, None, None, :].repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, ref_boxes: Tensor, memory: Tensor, spatial_shapes: list[int]) -> Tensor:
        """Attend.

        Args:
            query: ``[B, Q, C]`` (content + position).
            ref_boxes: ``[B, Q, 4]`` normalised cxcywh reference boxes (shared by all levels).
            memory: ``[B, S, C]`` flattened levels, ``S = sum(H_l * W_l)``.
            spatial_shapes: flat ``[H0, W0, H1, W1, ...]``.

        Returns:
            ``[B, Q, C]``.
        """
        b, q, _ = query.shape
        m, lv, p = self.heads, self.levels, self.points
        # [B, S, C] -> [B, S, M, C/M]
        value = self.value_proj(memory).view(b, memory.shape[1], m, self.dim // m)
        # [B, Q, M*L*P*2] -> [B, Q, M, L, P, 2]
        offsets = self.sampling_offsets(query).view(b, q, m, lv, p, 2)
        # softmax over levels x points of each head: [B, Q, M, L*P] -> [B, Q, M, L, P]
        weights = self.attention_weights(query).view(b, q, m, lv * p).softmax(-1).view(b, q, m, lv, p)
        ref = ref_boxes[:, :, None, None, None, :]
        # Offsets are in units of half the box size per point (rfdetr-upstream.md section 2.6).
        locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
        out = torch.ops.rfdetr.ms_deform_attn(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
