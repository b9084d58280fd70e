"""Multi-scale projector: ViT stage maps -> ``hidden_dim`` feature levels (LW-DETR, Chen et al., arXiv 2406.03459).

Per output level (P3 = x2, P4 = x1, P5 = x0.5 of the patch grid) every input stage is resampled, the results are
concatenated on channels and fused by a C2f block (YOLOv8-style CSP block, 3 bottlenecks without shortcut)
followed by a channel LayerNorm (rfdetr-upstream.md section 2.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCALE_OF_LEVEL = {"P3": 2.0, "P4": 1.0, "P5": 0.5}


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``[B, C, H, W]`` maps (eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C, H, W]`` (returned as a channels-last view)."""
        # [B, C, H, W] -> [B, H, W, C] -> norm -> back; no copy when x is stored channels-last.
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class ConvNormAct(nn.Module):
    """Conv2d (no bias, "same" padding) -> channel LayerNorm -> activation."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, act: str = "silu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.norm = ChannelLayerNorm(c_out)
        self.act = nn.SiLU() if act == "silu" else nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 ConvNormAct (SiLU), no residual (upstream builds C2f with ``shortcut=False``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.cv1 = ConvNormAct(channels, channels, 3)
        self.cv2 = ConvNormAct(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(self.cv1(x))


class C2f(nn.Module):
    """CSP block: 1x1 conv to ``2c``, chain of bottlenecks on the second half, concat all, 1x1 conv out."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int = 3) -> None:
        super().__init__()
        self.hidden = c_out // 2
        self.cv1 = ConvNormAct(c_in, 2 * self.hidden, 1)
        self.blocks = nn.ModuleList(Bottleneck(self.hidden) for _ in range(num_blocks))
        self.cv2 = ConvNormAct((2 + num_blocks) * self.hidden, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, c_in, H, W] -> [B, c_out, H, W]``."""
        parts = list(self.cv1(x).split(self.hidden, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


def _resampler(scale: float, channels: int) -> nn.Module:
    if scale == 1.0:
        return nn.Identity()
    if scale == 2.0:
        return nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2)
    if scale == 0.5:
        # Upstream's ConvX default activation (ReLU) applies on this path.
        return ConvNormAct(channels, channels, 3, stride=2, act="relu")
    raise ValueError(f"unsupported projector scale {scale}")


class ProjectorLevel(nn.Module):
    """One output level: resample each stage, concatenate, C2f, channel LayerNorm."""

    def __init__(self, in_channels: tuple[int, ...], out_channels: int, scale: float) -> None:
        super().__init__()
        self.resample = nn.ModuleList(_resampler(scale, c) for c in in_channels)
        fused = sum(int(c // max(1.0, scale)) for c in in_channels)
        self.c2f = C2f(fused, out_channels)
        self.norm = ChannelLayerNorm(out_channels)

    def forward(self, stages: list[Tensor]) -> Tensor:
        parts = [resample(s) for resample, s in zip(self.resample, stages, strict=True)]
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.norm(self.c2f(x))


class MultiScaleProjector(nn.Module):
    """Stage maps ``[B, C_i, h, w]`` -> one ``[B, out_channels, h*s, w*s]`` map per level in ``levels``."""

    def __init__(self, in_channels: tuple[int, ...], out_channels: int, levels: tuple[str, ...]) -> None:
        super().__init__()
        unknown = [lvl for lvl in levels if lvl not in SCALE_OF_LEVEL]
        if unknown:
            raise ValueError(f"unknown projector level(s) {unknown}; known: {', '.join(SCALE_OF_LEVEL)}")
        self.level_names = tuple(levels)
        self.levels = nn.ModuleList(
            ProjectorLevel(tuple(in_channels), out_channels, SCALE_OF_LEVEL[lvl]) for lvl in levels
        )

    def forward(self, stages: list[Tensor]) -> list[Tensor]:
        return [level(stages) for level in self.levels]
