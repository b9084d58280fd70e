"""Custom operators of rfdetr-core, registered under ``torch.ops.rfdetr``.

``torch.ops.rfdetr.ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)`` is the
single entry point that ``rfdetr_core.models`` calls (so ``models/`` imports only torch). Shapes are those of
:func:`rfdetr_core.ops.deform_attn.ms_deform_attn_pytorch`; the three tensors are promoted to one common
dtype, which the output has.

The op is registered as ``CompositeImplicitAutograd``. The backend in force (``RFDETR_DEFORM_ATTN`` or
``with use_backend("auto"|"cuda"|"pytorch"|"gather"):``, see :mod:`rfdetr_core.ops.backend`) picks the
implementation: CPU tensors, and CUDA tensors under ``pytorch`` (or ``auto`` with no buildable kernel), run the
grid_sample path; any tensor under ``gather`` runs the gather path (for exports without ``GridSample``); both
are pure PyTorch, which autograd, ``torch.compile`` and ONNX export trace straight through. Other CUDA tensors
go to the kernel from ``csrc/`` (``torch.ops.rfdetr._ms_deform_attn_cuda``, built just in time, autograd in
C++, fake implementations for ``torch.compile``); see :mod:`rfdetr_core.ops.cuda_ext`.
"""

from __future__ import annotations

import torch

from rfdetr_core.ops.backend import BACKEND_ENV, BACKENDS, requested_backend, use_backend
from rfdetr_core.ops.cuda_ext import (
    KernelBuildError,
    check_kernel_inputs,
    kernel_loaded,
    use_cuda_kernel,
)
from rfdetr_core.ops.deform_attn import ms_deform_attn_gather, ms_deform_attn_pytorch


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention on the backend in force (:func:`requested_backend`).

    Args:
        value: ``[B, S, M, D]``, ``S = sum(H_l * W_l)``.
        spatial_shapes: flat ``[H_0, W_0, H_1, W_1, ...]``.
        sampling_locations: ``[B, Q, M, L, P, 2]`` (x, y) in [0, 1].
        attention_weights: ``[B, Q, M, L, P]``.

    Returns:
        ``[B, Q, M * D]`` in the common dtype of the three tensors.
    """
    dtype = torch.promote_types(
        torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype
    )
    # Casts are no-ops in the usual single-dtype case; they stay outside the kernel so autograd sees them.
    value, sampling_locations, attention_weights = (
        value.to(dtype),
        sampling_locations.to(dtype),
        attention_weights.to(dtype),
    )
    choice = requested_backend()
    if choice == "gather":
        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)
    # "pytorch" never consults the kernel loader (no build attempt, no warning)
    if value.is_cuda and choice != "pytorch" and use_cuda_kernel():
        check_kernel_inputs(value, spatial_shapes, sampling_locations, attention_weights)
        return torch.ops.rfdetr._ms_deform_attn_cuda(
            value, spatial_shapes, sampling_locations, attention_weights
        )
    return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)


_lib = torch.library.Library("rfdetr", "DEF")
_lib.define(
    "ms_deform_attn(Tensor value, SymInt[] spatial_shapes, Tensor sampling_locations, "
    "Tensor attention_weights) -> Tensor"
)
_lib.impl("ms_deform_attn", ms_deform_attn, "CompositeImplicitAutograd")


def deform_attn_backend() -> str:
    """The implementation CUDA tensors use now: ``"cuda"``, ``"pytorch"`` or ``"gather"``.

    Resolves the backend in force like a call on a CUDA tensor would (building the kernel if needed, raising
    :class:`KernelBuildError` for ``cuda`` when it cannot be built); ``"pytorch"`` without a CUDA device.
    """
    choice = requested_backend()
    if choice == "gather":
        return "gather"
    if choice != "cuda" and not torch.cuda.is_available():
        return "pytorch"
    return "cuda" if use_cuda_kernel() else "pytorch"


__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "KernelBuildError",
    "deform_attn_backend",
    "kernel_loaded",
    "ms_deform_attn",
    "ms_deform_attn_gather",
    "ms_deform_attn_pytorch",
    "requested_backend",
    "use_backend",
]
