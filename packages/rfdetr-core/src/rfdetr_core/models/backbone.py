"""Windowed DINOv2 ViT encoder (Oquab et al., "DINOv2", arXiv 2304.07193) as used by RF-DETR.

The patch grid is cut into ``num_windows x num_windows`` windows; each window is run as its own sequence with a
private copy of the (position-embedded) CLS token. Blocks listed in ``window_block_indexes`` attend inside their
window; the others attend across all windows of the image (CLS copies included), which is the same as merging
the ``nw^2`` window sequences of one image into one sequence (rfdetr-upstream.md section 2.2).

Only the blocks whose output is used are built: stage ``s`` is the output of block ``s - 1``, so a model whose
last requested stage is ``s_max`` runs ``s_max`` blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def resize_patch_pos_embed(table: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resize a square position table to another patch grid.

    Args:
        table: ``[1, 1 + P*P, C]`` (CLS entry first, then the ``P x P`` grid row-major).
        grid: target ``(Hp, Wp)``.

    Returns:
        ``[1, 1 + Hp*Wp, C]`` in ``table``'s dtype.

    Bicubic, ``align_corners=False``, antialiased and computed in float32, as upstream does at run time and
    when loading a checkpoint of another size (rfdetr-upstream.md section 2.2).
    """
    side = int(round((table.shape[1] - 1) ** 0.5))
    if side * side != table.shape[1] - 1:
        raise ValueError(f"position table of {table.shape[1] - 1} patch entries is not a square grid")
    if (side, side) == tuple(grid):
        return table
    dim = table.shape[-1]
    # [1, P*P, C] -> [1, C, P, P]
    patch = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(
        patch.float(),
        size=tuple(grid),
        mode="bicubic",
        align_corners=False,
        antialias=patch.device.type != "mps",
    ).to(table.dtype)
    # [1, C, Hp, Wp] -> [1, Hp*Wp, C]
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)
    return torch.cat([table[:, :1], patch], dim=1)


class ViTAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"encoder width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, out_scale: Tensor | None = None) -> Tensor:
        """``x [N, T, C] -> [N, T, C]``; ``out_scale [C]`` (LayerScale) is folded into the output projection."""
        n, t, c = x.shape
        # [N, T, 3C] -> [3, N, heads, T, C/heads]
        qkv = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        # [N, heads, T, d] -> [N, T, C]
        out = out.transpose(1, 2).reshape(n, t, c)
        return _scaled_linear(out, self.proj, out_scale)


def _scaled_linear(x: Tensor, linear: nn.Linear, scale: Tensor | None) -> Tensor:
    """``linear(x) * scale`` computed as one linear with scaled rows (saves a pass over the activations)."""
    if scale is None:
        return linear(x)
    return F.linear(x, linear.weight * scale[:, None], linear.bias * scale)


class ViTBlock(nn.Module):
    """Pre-norm transformer block with LayerScale: ``x + ls1 * attn(norm1(x))``, ``x + ls2 * mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = ViTAttention(dim, heads)
        self.ls1 = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.mlp.fc2 = nn.Linear(dim * mlp_ratio, dim)
        self.ls2 = nn.Parameter(torch.ones(dim))
        self.drop_path = 0.0  # stochastic depth rate in training (Huang et al., ECCV 2016)

    def _keep(self, h: Tensor, windows: int) -> Tensor:
        """Drop the residual branch ``h [B*nw^2, T, C]`` per image with probability ``drop_path``."""
        if not self.training or self.drop_path <= 0.0:
            return h
        keep = 1.0 - self.drop_path
        images = h.shape[0] // windows
        # [B, 1, 1] -> [B*nw^2, 1, 1]: all windows of an image share the draw.
        mask = (torch.rand(images, 1, 1, device=h.device) < keep).to(h.dtype) / keep
        return h * mask.repeat_interleave(windows, dim=0)

    def forward(self, x: Tensor, merge_windows: int = 1, windows: int = 1) -> Tensor:
        """``x [B*nw^2, T, C]`` (``windows = nw^2``); ``merge_windows = nw^2`` makes attention global across an
        image's windows, 1 keeps it inside each window."""
        h = self.norm1(x)
        if merge_windows > 1:
            n, t, c = h.shape
            # [B*nw^2, T, C] -> [B, nw^2*T, C]: windows of one image are consecutive in the batch.
            h = self.attn(h.view(n // merge_windows, merge_windows * t, c), self.ls1).view(n, t, c)
        else:
            h = self.attn(h, self.ls1)
        x = x + self._keep(h, windows)
        h = F.gelu(self.mlp.fc1(self.norm2(x)))
        return x + self._keep(_scaled_linear(h, self.mlp.fc2, self.ls2), windows)


class WindowedViT(nn.Module):
    """DINOv2 ViT with windowed attention returning the requested stages as feature maps.

    Args:
        dim: token width. heads: attention heads.
        patch_size: square patch side in pixels.
        num_windows: windows per side (1 = plain global ViT).
        pos_grid: side ``P`` of the learned position table (``1 + P*P`` entries).
        out_feature_indexes: 1-based stages to return (stage ``s`` = output of block ``s - 1``; 0 = embeddings).
        window_block_indexes: 0-based blocks that attend inside their window.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        patch_size: int,
        num_windows: int,
        pos_grid: int,
        out_feature_indexes: tuple[int, ...],
        window_block_indexes: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.dim = dim
        self.patch_size = patch_size
        self.num_windows = num_windows
        self.pos_grid = pos_grid
        self.out_feature_indexes = tuple(out_feature_indexes)
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
        # Blocks past the last requested stage would be dead compute.
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(max(self.out_feature_indexes)))
        windowed = set(window_block_indexes)
        self.global_blocks = tuple(i for i in range(len(self.blocks)) if i not in windowed)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DINOv2 from-scratch init: truncated normal (std 0.02) weights, zero biases, unit LayerNorms/LayerScale."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth in training, ramped linearly from 0 (first block) to ``rate`` (last block)."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path rate must be in [0, 1), got {rate}")
        last = max(len(self.blocks) - 1, 1)
        for i, block in enumerate(self.blocks):
            block.drop_path = rate * i / last

    def position_table(self, grid: tuple[int, int]) -> Tensor:
        """The position table for a ``(Hp, Wp)`` patch grid: ``[1, 1 + Hp*Wp, C]``."""
        return resize_patch_pos_embed(self.pos_embed, grid)

    def forward(self, images: Tensor, pos_table: Tensor | None = None) -> list[Tensor]:
        """``images [B, 3, H, W]`` -> one ``[B, C, H/patch, W/patch]`` map per requested stage (final LayerNorm
        applied, CLS dropped). H and W must be multiples of ``patch_size * num_windows`` (checked by the caller).

        ``pos_table``: ``[1, 1 + Hp*Wp, C]`` for this input's patch grid, precomputed (a deploy model bakes it,
        so that no bicubic resize runs in a traced graph); default :meth:`position_table` of the grid."""
        b = images.shape[0]
        nw = self.num_windows
        # [B, C, Hp, Wp] -> [B, Hp, Wp, C]
        x = self.patch_embed(images).permute(0, 2, 3, 1)
        hp, wp = x.shape[1], x.shape[2]
        pos = self.position_table((hp, wp)) if pos_table is None else pos_table
        x = x + pos[:, 1:].view(1, hp, wp, self.dim)
        cls = self.cls_token + pos[:, :1]
        hh, ww = hp // nw, wp // nw
        # [B, Hp, Wp, C] -> [B, nw, hh, nw, ww, C] -> [B, nw, nw, hh, ww, C] -> [B*nw^2, hh*ww, C]
        # (windows ordered image, window-row, window-column; tokens row-major inside a window)
        x = (
            x.view(b, nw, hh, nw, ww, self.dim)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(b * nw * nw, hh * ww, self.dim)
        )
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)

        wanted = set(self.out_feature_indexes)
        stages: dict[int, Tensor] = {0: x} if 0 in wanted else {}
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            merge = nw * nw if i in self.global_blocks else 1
            if use_ckpt:
                x = checkpoint(block, x, merge, nw * nw, use_reentrant=False)
            else:
                x = block(x, merge, nw * nw)
            if i + 1 in wanted:
                stages[i + 1] = x

        maps = []
        for s in self.out_feature_indexes:
            y = self.norm(stages[s][:, 1:])
            # [B*nw^2, hh*ww, C] -> [B, nw, nw, hh, ww, C] -> [B, nw, hh, nw, ww, C] -> [B, Hp, Wp, C]
            y = y.view(b, nw, nw, hh, ww, self.dim).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, self.dim)
            # NCHW view of channels-last storage: the projector's convs take it without a copy.
            maps.append(y.permute(0, 3, 1, 2))
        return maps
