"""Dot-product mask head of RF-DETR-Seg (rfdetr-upstream.md section 2.9).

The first projector level is resized to ``H/4 x W/4`` and refined by one depthwise-conv block per decoder layer
(block ``i`` pairs with decoder layer ``i``); a 1x1 projection gives per-pixel embeddings. Queries pass a residual
MLP and a linear projection; mask logits are the channel dot product plus one learned scalar bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DepthwiseConvBlock(nn.Module):
    """``x + GELU(Linear(LayerNorm(dwconv3x3(x))))`` on ``[B, C, h, w]`` (ConvNeXt block without its MLP)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # [B, C, h, w] -> [B, h, w, C] for the per-pixel norm and linear, then back (views of channels-last data).
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = F.gelu(self.pwconv(self.norm(y)))
        return x + y.permute(0, 3, 1, 2)


class QueryMLP(nn.Module):
    """Residual ``x + fc2(GELU(fc1(LayerNorm(x))))`` with a 4x hidden width."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class MaskHead(nn.Module):
    """Per-query mask logits at ``1/downsample`` of the input size.

    Attributes:
        fold_in_training: whether :meth:`lazy` folds the 1x1 spatial projection into the queries
            (:meth:`folded_queries`); ``None`` (default) = on CUDA, where it saves one projected ``[B, C, h, w]``
            map per layer in the backward pass's memory (seg-medium, batch 8: 7 x 46 MiB in bf16) and its
            convolutions; elsewhere the projected maps as upstream computes them, which keeps the float order
            of 0.1.x so that a seeded CPU run (the demo) repeats the numbers of earlier releases. Inference
            always folds.
    """

    def __init__(self, dim: int, num_blocks: int, downsample: int = 4) -> None:
        super().__init__()
        self.downsample = downsample
        self.fold_in_training: bool | None = None
        self.blocks = nn.ModuleList(DepthwiseConvBlock(dim) for _ in range(num_blocks))
        self.spatial_proj = nn.Conv2d(dim, dim, kernel_size=1)
        self.query_mlp = QueryMLP(dim)
        self.query_proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros(1))

    def _resize(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        size = (image_size[0] // self.downsample, image_size[1] // self.downsample)
        return F.interpolate(features, size=size, mode="bilinear", align_corners=False)

    def query_embed(self, hs: Tensor) -> Tensor:
        """Decoder output ``[B, N, C]`` -> mask query embeddings ``[B, N, C]``."""
        return self.query_proj(self.query_mlp(hs))

    def folded_queries(self, hs: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder output ``[B, N, C]`` -> queries folded through the 1x1 spatial projection.

        The projection is linear, so ``q . (W x + b) + bias = (q W) . x + (q . b + bias)``: the logits need
        ``Q*C*C`` multiply-adds for ``q W`` instead of ``h*w*C*C`` for ``W x`` (``h*w`` is 10-40x ``Q``), and in
        training no projected ``[B, C, h, w]`` map is made or kept for the backward pass.

        Returns:
            ``q W`` ``[B, N, C]`` and the per-query bias ``q . b + bias`` ``[B, N]``.
        """
        q = self.query_embed(hs)
        c = q.shape[-1]
        return q @ self.spatial_proj.weight.view(c, c), q @ self.spatial_proj.bias + self.bias

    def forward(self, features: Tensor, hs: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Dense masks of the last decoder layer (inference).

        Args:
            features: ``[B, C, h, w]`` first projector level.
            hs: ``[B, Q, C]`` last decoder layer output.
            image_size: model input ``(H, W)``.

        Returns:
            ``[B, Q, H/4, W/4]`` logits.
        """
        # Channels-last storage makes the blocks' per-pixel permutes free views.
        x = self._resize(features, image_size).contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            x = block(x)
        b, c, h, w = x.shape
        q_folded, q_bias = self.folded_queries(hs)  # [B, Q, C], [B, Q]
        # [B, C, h, w] -> [B, h*w, C] (a view when x is channels-last)
        pixels = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        masks = torch.baddbmm(q_bias[..., None], q_folded, pixels.transpose(1, 2))
        return masks.view(b, q_folded.shape[1], h, w)

    def lazy(
        self,
        features: Tensor,
        hs_layers: list[Tensor],
        enc_features: Tensor | None,
        image_size: tuple[int, int],
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor] | None]:
        """Lazy mask entries for training: the criterion forms logits only for matched pairs.

        Args:
            features: ``[B, C, h, w]`` first projector level.
            hs_layers: each decoder layer's output ``[B, N, C]``.
            enc_features: ``[B, N, C]`` two-stage selected memory, or None.

        Returns:
            One dict per decoder layer and one for the encoder output (or None), each
            ``{"spatial_features": [B, C, H/4, W/4], "query_features": [B, N, C], "bias": [B, N] or [1]}``;
            the logits of query ``n`` in image ``b`` are
            ``einsum("c,chw->hw", query_features[b, n], spatial_features[b]) + bias[b, n]`` (a ``[1]`` bias is
            one scalar for all). Folded (:attr:`fold_in_training`): the pixel embeddings before the 1x1
            projection, the queries folded through it and a per-query bias ``[B, N]``; else the projected map,
            the query embeddings and the head's scalar bias ``[1]``.
        """
        x = self._resize(features, image_size)
        fold = x.is_cuda if self.fold_in_training is None else self.fold_in_training
        entry = self._folded_entry if fold else self._projected_entry
        enc = None
        if enc_features is not None:
            # The encoder output pairs with the resized map before any block.
            enc = entry(x, enc_features)
        layers = []
        for block, hs in zip(self.blocks, hs_layers, strict=True):
            x = block(x)
            layers.append(entry(x, hs))
        return layers, enc

    def _folded_entry(self, x: Tensor, hs: Tensor) -> dict[str, Tensor]:
        q_folded, q_bias = self.folded_queries(hs)
        # Under autocast the blocks' residual stream is float32 while the products (and the projected map this
        # replaces) are bf16: hand over the map in the products' dtype, half the bytes to keep for backward.
        return {"spatial_features": x.to(q_folded.dtype), "query_features": q_folded, "bias": q_bias}

    def _projected_entry(self, x: Tensor, hs: Tensor) -> dict[str, Tensor]:
        return {"spatial_features": self.spatial_proj(x), "query_features": self.query_embed(hs), "bias": self.bias}
