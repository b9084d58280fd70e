"""Point sampling for the mask losses and the mask matching costs.

Mask losses are evaluated on a few hundred points per mask rather than on the whole ``h x w`` grid
(PointRend, Kirillov et al., CVPR 2020, arXiv 1912.08193; adopted by Mask2Former, arXiv 2112.01527).
Points are ``(x, y)`` pairs in normalised ``[0, 1]`` image coordinates, so predictions and ground-truth masks
of different resolutions are sampled at the same places: predictions bilinearly, ground truth with nearest.

The samplers are plain callables so tests (and the parity test against upstream RF-DETR) can fix the points:

- loss points: ``point_sampler(mask_logits [M, 1, h, w], num_points) -> [M, num_points, 2]``
- matcher points: ``match_point_sampler(num_points, device) -> [num_points, 2]`` (shared by the whole batch)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

PointSampler = Callable[[Tensor, int], Tensor]
MatchPointSampler = Callable[[int, torch.device], Tensor]


def sample_points(maps: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample feature maps at normalised points.

    Args:
        maps: ``[N, C, H, W]``.
        coords: ``[N, P, 2]`` (x, y) in ``[0, 1]``; pixel centres sit at ``(i + 0.5) / W`` (align_corners False),
            points outside the outermost centres take the border value.

    Returns:
        ``[N, C, P]``.
    """
    sampled = F.grid_sample(maps, _grid(coords), mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.squeeze(3)  # [N, C, P, 1] -> [N, C, P]


def _grid(coords: Tensor) -> Tensor:
    """``[N, P, 2]`` points in ``[0, 1]`` -> ``[N, P, 1, 2]`` in grid_sample's ``[-1, 1]``."""
    return (2.0 * coords - 1.0).unsqueeze(2)


def sample_points_backward(grad: Tensor, maps: Tensor, coords: Tensor) -> Tensor:
    """The gradient of one-channel :func:`sample_points` with respect to its maps, by the kernel autograd runs
    (the same interpolation, border padding and ``align_corners``): ``grad [N, P]``, ``maps [N, 1, h, w]``,
    ``coords [N, P, 2]`` -> ``[N, h*w]``, in the maps' dtype. The maps are read, not kept."""
    bilinear, border = 0, 1  # grid_sampler's enum values of mode="bilinear" and padding_mode="border"
    grad_maps, _ = torch.ops.aten.grid_sampler_2d_backward(
        grad[:, None, :, None], maps, _grid(coords), bilinear, border, False, [True, False]
    )
    return grad_maps.view(grad_maps.shape[0], -1)


def biased_maps(products: Tensor, bias: Tensor, height: int, width: int) -> Tensor:
    """``products.float() + bias`` as maps: ``[M, h*w]``, ``[M]`` -> ``[M, 1, h, w]``.

    Low-precision products (bf16 under autocast) are added in place into their float32 copy, so no second float32
    copy exists even for a moment (these run while a training step's memory peaks); float32 products, which
    ``.float()`` does not copy, are added out of place. The same values either way.
    """
    if products.dtype in (torch.bfloat16, torch.float16) and bias.dtype == torch.float32:
        maps = products.float().add_(bias[:, None])
    else:
        maps = products.float() + bias[:, None]
    return maps.view(-1, 1, height, width)


def sample_biased_products(products: Tensor, bias: Tensor, maps: Tensor, coords: Tensor) -> Tensor:
    """:func:`sample_points` of the float32 maps ``products + bias``, keeping the products for the backward pass
    in their own dtype rather than the float32 maps.

    ``F.grid_sample`` keeps its float32 input for the backward pass; under bf16 autocast the products are bf16,
    so keeping them instead and rebuilding the maps in the backward pass halves what the mask loss holds while
    the step's memory peaks (seg-medium, batch 8: 6 layers x 38 MiB of float32 maps). Same values and gradients
    (the same kernels run on the same maps).

    Args:
        products: ``[M, h*w]`` mask logits before their bias (any float dtype).
        bias: ``[M]`` float32 per-mask bias.
        maps: ``[M, 1, h, w]`` float32 ``products + bias``, as the caller already built them (without grad) to
            draw its points: sampled here, not kept.
        coords: ``[M, P, 2]`` float32 points as in :func:`sample_points`.

    Returns:
        ``[M, P]`` float32.
    """
    return _SampleBiasedProducts.apply(products, bias, maps.detach(), coords)


class _SampleBiasedProducts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, products, bias, maps, coords):  # type: ignore[override]
        ctx.save_for_backward(products, bias, coords)
        ctx.size = maps.shape[-2:]
        return sample_points(maps, coords)[:, 0]  # [M, P]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        products, bias, coords = ctx.saved_tensors
        height, width = ctx.size
        grad_maps = sample_points_backward(grad, biased_maps(products, bias, height, width), coords)  # [M, h*w]
        grad_products = grad_maps.to(products.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_maps.sum(1) if ctx.needs_input_grad[1] else None
        return grad_products, grad_bias, None, None


class ImportancePointSampler:
    """PointRend importance sampling of loss points, on no-grad logits.

    Draw ``oversample_ratio x P`` uniform candidates, keep the ``importance_ratio x P`` most uncertain ones
    (uncertainty ``-|logit|`` at the bilinearly sampled point, i.e. closest to the decision boundary) and fill
    the rest with fresh uniform points. Defaults 3 and 0.75 are upstream RF-DETR's (and Mask2Former's). The
    draws come from ``generator`` (``None`` = torch's global RNG, which the engine seeds and checkpoints).

    Call: ``sampler(mask_logits [M, 1, h, w], num_points) -> [M, num_points, 2]``.
    """

    def __init__(
        self,
        oversample_ratio: float = 3.0,
        importance_ratio: float = 0.75,
        generator: torch.Generator | None = None,
    ) -> None:
        if oversample_ratio < 1.0:
            raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
        if not 0.0 <= importance_ratio <= 1.0:
            raise ValueError(f"importance_ratio must be in [0, 1], got {importance_ratio}")
        self.oversample_ratio = oversample_ratio
        self.importance_ratio = importance_ratio
        self.generator = generator

    @torch.no_grad()
    def __call__(self, mask_logits: Tensor, num_points: int) -> Tensor:
        num_masks = mask_logits.shape[0]
        device = mask_logits.device
        num_candidates = int(num_points * self.oversample_ratio)
        candidates = self._rand(num_masks, num_candidates, device)
        uncertainty = -sample_points(mask_logits, candidates)[:, 0].abs()  # [M, num_candidates]
        num_uncertain = int(self.importance_ratio * num_points)
        top = uncertainty.topk(num_uncertain, dim=1).indices  # [M, num_uncertain]
        points = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))  # [M, num_uncertain, 2]
        num_random = num_points - num_uncertain
        if num_random > 0:
            fresh = self._rand(num_masks, num_random, device)
            points = torch.cat([points, fresh], dim=1)
        return points

    def _rand(self, num_masks: int, count: int, device: torch.device) -> Tensor:
        """``[num_masks, count, 2]`` uniform in [0, 1). ``generator=None`` is not passed on: torch.compile cannot
        trace ``rand`` with a generator argument and symbolic sizes (the criterion's ``compile_losses``)."""
        if self.generator is None:
            return torch.rand(num_masks, count, 2, device=device)
        return torch.rand(num_masks, count, 2, device=device, generator=self.generator)


class UniformPointSampler:
    """Uniform points shared by every prediction and target of a batch (the matcher's mask costs).

    Call: ``sampler(num_points, device) -> [num_points, 2]``.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, num_points: int, device: torch.device) -> Tensor:
        return torch.rand(num_points, 2, device=device, generator=self.generator)


def loss_num_points(height: int, width: int, ratio: int) -> int:
    """Points per matched mask in the loss: ``max(h, h*w // ratio)`` (upstream RF-DETR's rule)."""
    return max(height, height * width // ratio)


def match_num_points(height: int, width: int, ratio: int) -> int:
    """Points shared by the batch in the matcher's mask costs: ``h*w // ratio`` (at least 1)."""
    return max(1, height * width // ratio)
