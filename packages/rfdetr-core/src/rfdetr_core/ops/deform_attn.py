"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021), pure-PyTorch paths.

:func:`ms_deform_attn_pytorch` (``F.grid_sample`` per level) is the reference implementation behind
``torch.ops.rfdetr.ms_deform_attn``; the CUDA kernel built from ``csrc/`` and :func:`ms_deform_attn_gather`
(one gather, no ``GridSample`` in an exported graph) must match it. Sampling is bilinear with zero padding
outside the map and ``align_corners=False`` (pixel centres at ``(i + 0.5) / size``), as upstream RF-DETR does.

In :func:`ms_deform_attn_pytorch`, bfloat16 and float16 CPU inputs are sampled in float32 (the result is cast
back to the input dtype). torch's CPU ``grid_sample`` for these 16-bit dtypes (measured on torch 2.15) reads the
right element only while its offset in an ``(n, c)`` plane, ``y * stride_H + x * stride_W``, is below ``2**15``;
further reads return other memory (garbage or NaN), as if the offset wrapped in 16 bits. The per-level value
view is not contiguous when ``B == 1``: ``stride_W = M * D`` (256 for most variants), so every level of more
than ``2**15 / (M * D)`` cells (128) gave NaN; a contiguous copy would only move the limit to planes of
``2**15`` cells. The same kernel computes source coordinates in the input dtype too (bfloat16 keeps 8
significant bits: a whole pixel on a 200-pixel map). float32 has neither problem. CUDA tensors are sampled in
their own dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def level_shapes(spatial_shapes: list[int]) -> list[tuple[int, int]]:
    """``[H0, W0, H1, W1, ...]`` -> ``[(H0, W0), (H1, W1), ...]``."""
    if len(spatial_shapes) % 2:
        raise ValueError(f"spatial_shapes must hold (H, W) pairs, got {len(spatial_shapes)} numbers")
    return list(zip(spatial_shapes[0::2], spatial_shapes[1::2], strict=True))


def _sampler_dims(
    value: torch.Tensor, spatial_shapes: list[int], sampling_locations: torch.Tensor
) -> tuple[list[tuple[int, int]], tuple[int, int, int, int], tuple[int, int, int]]:
    """The sizes both samplers read: ``(level (H, W) pairs, value's (B, S, M, D), (Q, L, P))``.

    ``value [B, S, M, D]``, ``sampling_locations [B, Q, M, L, P, 2]``; raises ``ValueError`` when ``L`` is not
    the number of ``(H, W)`` pairs in ``spatial_shapes``.
    """
    shapes = level_shapes(spatial_shapes)
    _, queries, _, levels, points, _ = sampling_locations.shape
    if levels != len(shapes):
        raise ValueError(f"sampling_locations has {levels} levels but spatial_shapes has {len(shapes)}")
    return shapes, tuple(value.shape), (queries, levels, points)


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
    shapes, (batch, _, heads, dim), (queries, levels, points) = _sampler_dims(
        value, spatial_shapes, sampling_locations
    )
    values = value.split([h * w for h, w in shapes], dim=1)
    # CPU 16-bit grid_sample misreads offsets >= 2**15 (see the module docstring): sample those in float32.
    wide = value.device.type == "cpu" and value.dtype in (torch.bfloat16, torch.float16)
    sample_dtype = torch.float32 if wide else value.dtype
    grids = 2 * sampling_locations.to(sample_dtype) - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # [B, HW, M, D] -> [B*M, D, H, W]
        v = values[lvl].flatten(2).transpose(1, 2).reshape(batch * heads, dim, h, w)
        # [B, Q, M, P, 2] -> [B*M, Q, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # -> [B*M, D, Q, P]
        s = F.grid_sample(v.to(sample_dtype), g, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled.append(s.to(value.dtype))
    # [B, Q, M, L, P] -> [B*M, 1, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    # [B*M, D, Q, L, P] -> [B*M, D, Q, L*P] -> weighted sum -> [B*M, D, Q]
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    # [B*M, D, Q] -> [B, M*D, Q] -> [B, Q, M*D]
    return out.view(batch, heads * dim, queries).transpose(1, 2).contiguous()


# Corner offsets (dx, dy) of the four bilinear taps, in the order the gather path stacks them.
_CORNER_DX = (0, 1, 0, 1)
_CORNER_DY = (0, 0, 1, 1)


def _int_constants(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[len(values)]`` int64 built by ops (``full`` + ``stack``), not a tensor literal: torch 2.11's ONNX
    exporter drops literals created in ``forward`` (lifted tensor constants) during its decompositions
    ("Constant tensor ...lifted_tensor_0 is not in the constants dictionary"); the constant folder folds these
    ops back into one initializer."""
    return torch.stack([torch.full((), int(v), dtype=torch.int64, device=device) for v in values])


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """:func:`ms_deform_attn_pytorch` built from one gather instead of ``F.grid_sample``.

    Same arguments, shapes and numbers (bilinear, zeros outside the map, ``align_corners=False``). In an
    exported graph it is Floor/Cast/Min/Max/GatherElements/MatMul, never ``GridSample``, and every reshape
    keeps the batch axis symbolic (``-1``), so a dynamic batch stays dynamic. Pixel coordinates and tap
    weights are computed in at least float32 (as the CUDA kernel's accumulator does), so an fp16 graph keeps
    exact integer indices; the result has ``value``'s dtype.

    Args:
        value: ``[B, S, M, D]``; spatial_shapes: flat ``[H_0, W_0, ...]`` of the ``L`` levels;
        sampling_locations: ``[B, Q, M, L, P, 2]`` (x, y) in [0, 1]; attention_weights: ``[B, Q, M, L, P]``.

    Returns:
        ``[B, Q, M * D]``.
    """
    shapes, (_, positions, heads, dim), (queries, levels, points) = _sampler_dims(
        value, spatial_shapes, sampling_locations
    )
    math_dtype = torch.promote_types(sampling_locations.dtype, torch.float32)
    device = value.device
    starts, start = [], 0
    for h, w in shapes:
        starts.append(start)
        start += h * w
    # Per-level constants, shaped to broadcast against [BM, Q, L, P, 4] (the taps on the last axis).
    width = _int_constants([w for _, w in shapes], device).view(levels, 1, 1)
    height = _int_constants([h for h, _ in shapes], device).view(levels, 1, 1)
    level_start = _int_constants(starts, device).view(levels, 1, 1)
    size_xy = _int_constants([v for h, w in shapes for v in (w, h)], device).to(math_dtype).view(levels, 1, 2)
    dx = _int_constants(_CORNER_DX, device)
    dy = _int_constants(_CORNER_DY, device)

    # [B, Q, M, L, P, 2] -> [B, M, Q, L, P, 2] -> [B*M, Q, L, P, 2], then to pixel coordinates
    xy = sampling_locations.to(math_dtype).transpose(1, 2).flatten(0, 1) * size_xy - 0.5
    corner = xy.floor()
    frac = xy - corner  # [BM, Q, L, P, 2]
    corner = corner.to(torch.int64)
    # [BM, Q, L, P, 4] integer tap coordinates and their bilinear weights
    tap_x = corner[..., 0:1] + dx
    tap_y = corner[..., 1:2] + dy
    # bilinear weights of the taps: (1 - f, f) per axis, their outer product in the taps' (dy, dx) order
    # (a Concat and one Mul in an exported graph; a Where per axis cost ONNX Runtime ~2.4 ms in seg-medium)
    weight_x = torch.cat((1 - frac[..., 0:1], frac[..., 0:1]), dim=-1)  # [BM, Q, L, P, 2]
    weight_y = torch.cat((1 - frac[..., 1:2], frac[..., 1:2]), dim=-1)
    weight_xy = (weight_y.unsqueeze(-1) * weight_x.unsqueeze(-2)).flatten(-2)  # [BM, Q, L, P, 4]
    inside = (tap_x >= 0) & (tap_x < width) & (tap_y >= 0) & (tap_y < height)
    # [B, Q, M, L, P] -> [B, M, Q, L, P] -> [BM, Q, L, P, 1]
    attn = attention_weights.to(math_dtype).transpose(1, 2).flatten(0, 1).unsqueeze(-1)
    tap_weight = weight_xy * inside.to(math_dtype) * attn  # [BM, Q, L, P, 4]
    # Outside taps read a clamped (valid) position with weight 0.
    index = level_start + torch.minimum(torch.maximum(tap_y, torch.zeros_like(tap_y)), height - 1) * width
    index = index + torch.minimum(torch.maximum(tap_x, torch.zeros_like(tap_x)), width - 1)

    # value [B, S, M, D] -> [B, M, S, D] -> [BM * S, D]: each tap reads one row
    rows_value = value.transpose(1, 2).reshape(-1, dim)
    taps = levels * points * 4
    # row of each tap among all BM maps: [BM, Q, L, P, 4] + [BM, 1, 1, 1, 1] offsets
    map_start = torch.arange(index.shape[0], device=device, dtype=torch.int64) * positions
    rows = index + map_start.view(-1, 1, 1, 1, 1)
    # [BM * Q * taps] rows -> [BM, Q, taps, D]. One row gather (ONNX Gather on axis 0) rather than gather
    # with an index expanded over D, which an exported graph materialises (an int64 Expand of D times the
    # taps): seg-medium's five layers' Expand + GatherElements took ~7 ms of ONNX Runtime's 2-core run.
    sampled = rows_value.index_select(0, rows.reshape(-1)).reshape(-1, queries, taps, dim)
    # [BM, Q, 1, taps] @ [BM, Q, taps, D] -> [BM, Q, 1, D]
    out = torch.matmul(tap_weight.reshape(-1, queries, 1, taps), sampled.to(math_dtype))
    # [BM, Q, 1, D] -> [B, M, Q, D] -> [B, Q, M, D] -> [B, Q, M*D]
    out = out.reshape(-1, heads, queries, dim).transpose(1, 2).reshape(-1, queries, heads * dim)
    return out.to(value.dtype)
