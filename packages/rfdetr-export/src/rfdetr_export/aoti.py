"""AOTInductor packages (``.pt2``): the deploy graph compiled ahead of time, loaded without tracing or compiling.

``torch.export`` traces core's :class:`~rfdetr_core.deploy.DeployModel` (dynamic or static batch) and
``torch._inductor.aoti_compile_and_package`` compiles it (:mod:`rfdetr_core.aot_package`) into a zip holding a
shared library, the weights and metadata (the model card under ``rfdetr_card``, how it was made under ``rfdetr_export``). Loading one is a
``dlopen`` plus the weights: no Dynamo, no code generation, so a second process starts in seconds where
``torch.compile`` traces and compiles again (see ``docs/benchmarks.md``). :class:`AotiModel` implements core's
runner seam and is registered for ``.pt2`` files, so ``RFDETR.from_file("model.pt2")`` and ``rfdetr-serve
model.pt2`` run it.

A package is compiled for one device type (``cpu`` or ``cuda``) and, on CPU, for the instruction sets of the
machine that built it (its metadata ``AOTI_CPU_ISA``): build it where it will run, with the same torch version.
CUDA packages are refused for now unless ``RFDETR_AOTI_CUDA=1`` is set: loading one crashed the process on the
one GPU run so far (:func:`rfdetr_core.aot_package.check_device_type`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rfdetr_core.aot_package import (
    AOTI_DEVICE_KEY,
    AotiDeviceError,
    check_device_type,
    compile_package,
    load_package,
)
from rfdetr_core.errors import RFDETRError, first_line
from rfdetr_export.onnx_export import (
    METADATA_CARD,
    METADATA_EXPORT,
    ExportError,
    _check_writable,
    sampler_backend,
)
from rfdetr_export.runtime import RuntimeLoadError, _card_from_metadata, _check_images, _run_chunked


@dataclass(frozen=True)
class AotiExportResult:
    """What :func:`export_aoti` wrote: the package, its size, the seconds of tracing and of compiling."""

    path: Path
    size_bytes: int
    export_seconds: float
    compile_seconds: float
    device: str
    dynamic_batch: bool
    batch: int


def export_aoti(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    resolution: tuple[int, int],
    card_metadata: dict,
    device: str | torch.device = "cpu",
    batch: int = 1,
    dynamic_batch: bool = False,
    sampler: str = "gather",
) -> AotiExportResult:
    """Trace ``module`` (``images [B, 3, H, W]`` float32 -> a tuple of tensors) on ``device`` and compile it into
    the AOTInductor package ``path`` (written atomically).

    Args:
        module: the deploy module (float32, eval mode); moved to ``device``.
        path: the ``.pt2`` file to write.
        resolution: ``(H, W)`` of its input.
        card_metadata: ``ModelCard.to_metadata()``, stored in the package.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``): the package runs on that device type only.
        batch: the batch of a static package (inputs of other sizes are cut and padded by :class:`AotiModel`).
        dynamic_batch: a symbolic batch axis (1 .. :data:`rfdetr_core.deploy.MAX_DYNAMIC_BATCH`) instead of
            ``batch``.
        sampler: deformable-attention sampler traced (``gather`` or ``gridsample``).
    """
    path = Path(path)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: no CUDA device here. Build the package on the machine that will run it.")
    if device.type not in ("cpu", "cuda"):
        raise ExportError(f"--device must be cpu or cuda, got {device}")
    try:
        check_device_type(device.type)
    except AotiDeviceError as exc:
        raise ExportError(f"--aoti --device {device.type}: {exc}") from exc
    if sampler == "trt-plugin":
        raise ExportError("--deform-attn trt-plugin is for TensorRT; use gather or gridsample with --aoti.")
    if batch < 1:
        raise ExportError(f"--batch must be at least 1, got {batch}")
    _check_writable(path)  # before minutes of compiling, as the ONNX export does
    from rfdetr_core.ops import use_backend

    module = module.to(device).eval()
    h, w = resolution
    # a dynamic axis needs an example of size >= 2 (torch.export specialises sizes 0 and 1)
    example = torch.randn(max(2, batch) if dynamic_batch else batch, 3, h, w, device=device)
    from rfdetr_core import __version__ as core_version
    from rfdetr_export import __version__ as export_version

    info = {
        "format": "aoti",
        "rfdetr_export": export_version,
        "rfdetr_core": core_version,
        "torch": torch.__version__,
        "dynamic_batch": dynamic_batch,
        "batch": None if dynamic_batch else batch,
        "deform_attn": sampler,
    }
    quiet = contextlib.ExitStack()
    with quiet:
        if not os.environ.get("RFDETR_EXPORT_DEBUG"):
            quiet.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        try:
            with use_backend(sampler_backend(sampler)):
                export_seconds, compile_seconds = compile_package(
                    module,
                    example,
                    path,
                    dynamic_batch=dynamic_batch,
                    metadata={METADATA_CARD: json.dumps(card_metadata), METADATA_EXPORT: json.dumps(info)},
                )
        except RFDETRError:
            raise
        except Exception as exc:
            raise ExportError(
                f"AOTInductor could not compile the model: {type(exc).__name__}: {first_line(exc)} "
                "(RFDETR_EXPORT_DEBUG=1 shows torch's output)"
            ) from exc
    return AotiExportResult(
        path=path,
        size_bytes=path.stat().st_size,
        export_seconds=export_seconds,
        compile_seconds=compile_seconds,
        device=device.type,
        dynamic_batch=dynamic_batch,
        batch=batch,
    )


class AotiModel:
    """An rfdetr-export ``.pt2`` AOTInductor package, behind core's runner seam (:mod:`rfdetr_core.runner`).

    Args:
        path: the ``.pt2`` file (its metadata must hold the model card).
        device: where to run (default: the device type it was compiled for; ``cuda:N`` picks the card).
            A package runs only on the device type it was compiled for.

    Calling it with ``images [B, 3, H, W]`` float32 (normalised) returns the deploy tuple ``(scores, labels,
    boxes, masks)`` on :attr:`device`; a static-batch package takes any ``B`` (chunks, the last one padded).
    """

    backend = "aoti"

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise RuntimeLoadError(f"AOTInductor package not found: {self.path}")
        wanted = torch.device(device) if device is not None else None
        if wanted is not None and wanted.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeLoadError(f"{self.path.name}: device {wanted} asked for, but no CUDA device is available")
        try:
            index = wanted.index if wanted is not None and wanted.index is not None else -1
            self.package, metadata = load_package(self.path, device_index=index)
        except AotiDeviceError as exc:
            raise RuntimeLoadError(f"{self.path.name}: {exc}") from exc
        except Exception as exc:  # torch raises RuntimeError / zip errors / loader errors of its own
            raise RuntimeLoadError(
                f"{self.path} cannot be loaded as an AOTInductor package ({first_line(exc) or type(exc).__name__}); it must be made by "
                "'rfdetr-export MODEL --aoti' with this torch version, on a machine like this one."
            ) from exc
        if METADATA_CARD not in metadata:
            raise RuntimeLoadError(
                f"{self.path} has no rfdetr model card in its metadata; export it with 'rfdetr-export MODEL --aoti'."
            )
        self.card = _card_from_metadata(json.loads(metadata[METADATA_CARD]), self.path)
        self.export_info = json.loads(metadata.get(METADATA_EXPORT, "{}"))
        built_for = metadata.get(AOTI_DEVICE_KEY, "cpu")
        if wanted is not None and wanted.type != built_for:
            raise RuntimeLoadError(
                f"{self.path.name} was compiled for {built_for} and cannot run on {wanted}; export it again "
                f"with --device {wanted.type}."
            )
        self.device = wanted or torch.device(built_for)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.static_batch = None if self.export_info.get("dynamic_batch", True) else self.export_info.get("batch")

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``images [B, 3, H, W]`` float32 normalised -> the deploy tuple on :attr:`device`."""
        _check_images(images, self.card.resolution, self.path)
        images = images.to(device=self.device, dtype=torch.float32).contiguous()
        with torch.inference_mode():
            return _run_chunked(images, self.static_batch, self.package)
