"""Just-in-time build and loading of the CUDA deformable-attention extension (sources in ``csrc/``).

The extension is compiled with ninja on first use (the first ``ms_deform_attn`` call on a CUDA tensor) into
``$RFDETR_HOME/extensions/<torch>-<cuda>-<arch>/`` and loaded from there afterwards. ``<arch>`` follows
``TORCH_CUDA_ARCH_LIST`` when set (as ``torch.utils.cpp_extension`` does), else the visible GPUs.

The backend in force (``RFDETR_DEFORM_ATTN`` or :func:`rfdetr_core.ops.use_backend`, see
:mod:`rfdetr_core.ops.backend`) decides whether CUDA tensors use it: ``auto`` if it builds (otherwise one
warning line), ``cuda`` always (a failed or impossible build raises :class:`KernelBuildError`), ``pytorch`` and
``gather`` never. CPU tensors never do. Loading registers ``torch.ops.rfdetr._ms_deform_attn_cuda``
(autograd in C++) and ``_ms_deform_attn_cuda_backward``, plus their fake implementations for
``torch.compile``.

The compilers are ``torch.utils.cpp_extension``'s: ``CXX``/``CC``/``CUDAHOSTCXX`` when set. A wrapper that links
libstdc++ statically (seen: ``/opt/gcc/bin/g++`` on the GPU image) makes any C++ error raised inside the
extension crash the process; inputs are therefore checked in Python first, and the system ``g++`` is the
compiler to use there.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from rfdetr_core.errors import RFDETRError
from rfdetr_core.ops.backend import BACKEND_ENV, requested_backend
from rfdetr_core.paths import extensions_dir

EXTENSION_NAME = "rfdetr_ms_deform_attn"
SOURCES = ("ms_deform_attn_ops.cpp", "ms_deform_attn_cuda.cu")
HEADERS = ("ms_deform_attn.h",)
MAX_LEVELS = 16  # kMaxLevels in csrc/ms_deform_attn.h

_log = logging.getLogger("rfdetr_core.ops")
_lock = threading.Lock()


@dataclass
class _BuildState:
    tried: bool = False
    loaded: bool = False
    failure: str | None = None  # one line: why the extension cannot be used
    error: BaseException | None = None  # the build's exception, chained into KernelBuildError
    warned: bool = False  # the auto-mode fallback line was logged


_state = _BuildState()


class KernelBuildError(RFDETRError, RuntimeError):
    """The CUDA deformable-attention kernel was asked for (backend ``cuda``) but cannot be built."""


def source_dir() -> Path | None:
    """Folder holding the ``csrc`` sources: ``rfdetr_core/_csrc`` in a wheel, ``<repo>/csrc`` in a checkout."""
    package = Path(__file__).resolve().parents[1]  # .../rfdetr_core
    candidates = [package / "_csrc"]
    if len(package.parents) > 3:  # <repo>/packages/rfdetr-core/src/rfdetr_core
        candidates.append(package.parents[3] / "csrc")
    for folder in candidates:
        if all((folder / name).is_file() for name in SOURCES + HEADERS):
            return folder
    return None


def _arch_tag() -> str:
    """``sm90``-style tag of the architectures the build targets (``TORCH_CUDA_ARCH_LIST`` or visible GPUs)."""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if listed:
        archs = [a for a in re.split(r"[;\s,]+", listed) if a]
        return "_".join("sm" + a.replace(".", "").replace("+PTX", "ptx") for a in archs)
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return "_".join(f"sm{major}{minor}" for major, minor in caps)


def build_dir() -> Path:
    """``$RFDETR_HOME/extensions/<torch>-<cuda>-<arch>/`` (not created)."""
    tag = f"{torch.__version__}-cuda{torch.version.cuda}-{_arch_tag()}"
    return extensions_dir() / re.sub(r"[^A-Za-z0-9._+-]", "_", tag)


def _why_impossible() -> str | None:
    """A one-line reason the extension cannot be built here, or None when building may be tried."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if source_dir() is None:
        return "the csrc/ sources are not installed with rfdetr_core (reinstall rfdetr-core from a wheel or sdist)"
    if cpp_extension.CUDA_HOME is None or not Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists():
        return "no CUDA compiler (nvcc) was found; set CUDA_HOME"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler was found; set CXX"
    return None


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    src = source_dir()
    assert src is not None  # checked by _why_impossible
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(src / name) for name in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        build_directory=str(out),
        is_python_module=False,
        verbose=os.environ.get("RFDETR_VERBOSE_BUILD", "") == "1",
    )
    _register_fakes()


def _register_fakes() -> None:
    """Shape-only implementations so FakeTensor / ``torch.compile`` can trace the CUDA ops."""

    @torch.library.register_fake("rfdetr::_ms_deform_attn_cuda")
    def _forward_fake(value, spatial_shapes, sampling_locations, attention_weights):
        batch, _, heads, dim = value.shape
        # [B, Q, M * D]
        return value.new_empty(batch, sampling_locations.shape[1], heads * dim)

    @torch.library.register_fake("rfdetr::_ms_deform_attn_cuda_backward")
    def _backward_fake(grad_output, value, spatial_shapes, sampling_locations, attention_weights):
        return (
            torch.empty_like(value),
            torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights),
        )


def check_kernel_inputs(
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise ``ValueError`` naming the problem unless the inputs fit the kernel (shapes as in the op).

    The C++ side checks the same things, but errors are reported here first, in Python: a C++ exception
    from an extension linked with a static libstdc++ (some toolchain wrappers add ``-static-libstdc++``)
    crashes the process instead of raising.
    """
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be [B, S, M, D], got {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be [B, Q, M, L, P, 2], got {tuple(sampling_locations.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(
            f"ms_deform_attn: attention_weights {tuple(attention_weights.shape)} must be sampling_locations' "
            f"[B, Q, M, L, P] = {tuple(sampling_locations.shape[:5])}"
        )
    batch, positions, heads, _ = value.shape
    if sampling_locations.shape[0] != batch or sampling_locations.shape[2] != heads:
        raise ValueError(
            f"ms_deform_attn: value {tuple(value.shape)} and sampling_locations "
            f"{tuple(sampling_locations.shape)} disagree on batch or heads"
        )
    if len(spatial_shapes) % 2 or not 1 <= len(spatial_shapes) // 2 <= MAX_LEVELS:
        raise ValueError(
            f"ms_deform_attn (CUDA): spatial_shapes must hold 1 to {MAX_LEVELS} (H, W) pairs, got {list(spatial_shapes)}"
        )
    levels = len(spatial_shapes) // 2
    if sampling_locations.shape[3] != levels:
        raise ValueError(
            f"ms_deform_attn: sampling_locations has {sampling_locations.shape[3]} levels but spatial_shapes "
            f"has {levels}"
        )
    if any(side <= 0 for side in spatial_shapes):
        raise ValueError(f"ms_deform_attn: spatial_shapes has an empty level: {list(spatial_shapes)}")
    covered = sum(spatial_shapes[2 * i] * spatial_shapes[2 * i + 1] for i in range(levels))
    if covered != positions:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes cover {covered} positions but value has S = {positions}"
        )
    if not (value.device == sampling_locations.device == attention_weights.device):
        raise ValueError(
            f"ms_deform_attn: inputs are on different devices: {value.device}, {sampling_locations.device}, "
            f"{attention_weights.device}"
        )
    out_numel = batch * sampling_locations.shape[1] * value.shape[2] * value.shape[3]
    if max(value.numel(), sampling_locations.numel(), out_numel) >= 2**31 - 1:
        raise ValueError("ms_deform_attn (CUDA): tensors of 2**31 or more elements are not supported")


def kernel_loaded() -> bool:
    """Whether the CUDA extension is loaded in this process (never triggers a build)."""
    return _state.loaded


def _try_build() -> None:
    reason = _why_impossible()
    if reason is None:
        try:
            _build_and_load()
        except Exception as exc:  # compiler or loader failure: reported by use_cuda_kernel, per the backend
            lines = str(exc).strip().splitlines()
            reason = f"the build failed ({type(exc).__name__}: {lines[0] if lines else ''})"
            _state.error = exc
    _state.tried, _state.loaded, _state.failure = True, reason is None, reason


def use_cuda_kernel() -> bool:
    """Whether CUDA tensors should go to the kernel, building and loading it on the first call.

    ``pytorch``, ``gather`` -> False. ``cuda`` -> True, or :class:`KernelBuildError` if it cannot be built.
    ``auto`` -> True if it builds, else False after logging one warning line (the build is tried once).
    """
    choice = requested_backend()
    if choice in ("pytorch", "gather"):
        return False
    if not _state.tried:
        with _lock:
            if not _state.tried:
                _try_build()
    if _state.loaded:
        return True
    if choice == "cuda":
        raise KernelBuildError(
            f"{BACKEND_ENV}=cuda (or use_backend('cuda')) but the CUDA deformable-attention kernel cannot be "
            f"built: {_state.failure}. Fix that, or use backend 'auto' (falls back to PyTorch) or 'pytorch'."
        ) from _state.error
    if not _state.warned:
        _state.warned = True
        _log.warning(
            "CUDA deformable attention unavailable: %s; using the pure-PyTorch path "
            "(RFDETR_DEFORM_ATTN=cuda makes this an error).",
            _state.failure,
        )
    return False


def reset_for_tests() -> None:
    """Forget a failed build attempt so the next call tries again (a loaded library stays loaded)."""
    global _state
    with _lock:
        if not _state.loaded:
            _state = _BuildState()
