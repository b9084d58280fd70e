"""Custom operators of rfdetr-core, registered under ``torch.ops.rfdetr``.

``torch.ops.rfdetr.ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)`` is the
single entry point that ``rfdetr_core.models`` calls (so ``models/`` imports only torch). Shapes are those of
:func:`rfdetr_core.ops.deform_attn.ms_deform_attn_pytorch`.

The pure-PyTorch implementation is registered as ``CompositeImplicitAutograd``: autograd, ``torch.compile``
and ONNX export trace straight through it. ``RFDETR_DEFORM_ATTN=auto|cuda|pytorch`` chooses the backend
(see :func:`deform_attn_backend`); the CUDA kernel from ``csrc/`` plugs in through the same op.
"""

from __future__ import annotations

import os

import torch

from rfdetr_core.ops.deform_attn import ms_deform_attn_pytorch

BACKEND_ENV = "RFDETR_DEFORM_ATTN"
_BACKENDS = ("auto", "cuda", "pytorch")

_lib = torch.library.Library("rfdetr", "DEF")
_lib.define(
    "ms_deform_attn(Tensor value, SymInt[] spatial_shapes, Tensor sampling_locations, "
    "Tensor attention_weights) -> Tensor"
)
_lib.impl("ms_deform_attn", ms_deform_attn_pytorch, "CompositeImplicitAutograd")


def requested_backend() -> str:
    """The backend asked for by ``$RFDETR_DEFORM_ATTN`` (default ``auto``)."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r} is not one of {', '.join(_BACKENDS)}.")
    return choice


def deform_attn_backend() -> str:
    """The backend actually in use: ``"pytorch"`` until the CUDA extension is built and loaded."""
    choice = requested_backend()
    if choice == "cuda":
        raise RuntimeError(
            f"{BACKEND_ENV}=cuda but the CUDA deformable-attention extension is not available in this "
            "build of rfdetr-core. Unset it or use RFDETR_DEFORM_ATTN=pytorch."
        )
    return "pytorch"


__all__ = ["BACKEND_ENV", "deform_attn_backend", "ms_deform_attn_pytorch", "requested_backend"]
