"""AOTInductor packages: a module compiled ahead of time into one ``.pt2`` file, loaded without tracing.

:func:`compile_package` runs ``torch.export`` and ``torch._inductor.aoti_compile_and_package`` (a shared library,
the weights and string metadata in a zip, written atomically); :func:`load_package` loads one (a library load
plus the weights: no Dynamo, no code generation). rfdetr-export's ``--aoti`` writes the deploy model this way,
and ``RFDETR.optimize(compile="aoti")`` keeps the network of its CUDA fast path as a package in the compile
cache (:func:`cached_package`), so a second process loads instead of compiling.

A package runs on the device type it was compiled for (metadata ``AOTI_DEVICE_KEY``) and, on CPU, needs the
instruction sets of the machine that built it (``AOTI_CPU_ISA``); it is tied to the torch version that made it.
CUDA packages are refused unless ``RFDETR_AOTI_CUDA=1`` is set: see :func:`check_device_type`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rfdetr_core.deploy import MAX_DYNAMIC_BATCH
from rfdetr_core.errors import RFDETRError

AOTI_DEVICE_KEY = "AOTI_DEVICE_KEY"  # torch's metadata key: the device type the package was compiled for
CUDA_OPT_IN = "RFDETR_AOTI_CUDA"  # =1: build and load CUDA packages anyway (see check_device_type)


class AotiDeviceError(RFDETRError, RuntimeError):
    """A package for a device type this library does not build or load yet (the message says why and what to do)."""


def check_device_type(device_type: str) -> None:
    """Refuse CUDA packages unless the environment sets ``RFDETR_AOTI_CUDA=1``.

    In the one GPU run so far (an H200, torch 2.11.0+cu130, 2026-12-07) loading a CUDA package of a seg deploy
    network right after compiling it ended the process with a segmentation fault inside torch's
    ``aoti_load_package``: nothing can catch that, and a server would go down with it. Until a GPU run shows CUDA
    packages loading, building or loading one needs the opt-in (which such a run sets). CPU packages are tested.
    """
    if device_type == "cuda" and os.environ.get(CUDA_OPT_IN) != "1":
        raise AotiDeviceError(
            "AOTInductor packages for CUDA are disabled: loading one crashed the process (segmentation fault in "
            "torch 2.11's loader on an H200) and no GPU run has shown them working yet. Use "
            "optimize(compile=True) or an ONNX/TensorRT export on the GPU, a CPU package (--device cpu), or set "
            f"{CUDA_OPT_IN}=1 to try anyway."
        )


def package_device_type(path: str | os.PathLike) -> str | None:
    """The device type (``"cpu"``, ``"cuda"``) a package was compiled for, read from its metadata file without
    loading it; ``None`` if the file holds none (not a package, or another layout)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith("wrapper_metadata.json"):  # torch's layout: <model>/data/aotinductor/<name>/
                    return json.loads(archive.read(name)).get(AOTI_DEVICE_KEY)
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return None


def compile_package(
    module: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool,
    metadata: Mapping[str, str],
    max_batch: int = MAX_DYNAMIC_BATCH,
) -> tuple[float, float]:
    """Export ``module`` on ``example`` (``[B, ...]``, on the module's device and in its input dtype) and compile
    it into the package ``path`` (written atomically). Returns ``(export_seconds, compile_seconds)``.

    Args:
        dynamic_batch: a symbolic first axis (``1 .. max_batch``; ``example`` needs ``B >= 2``, since
            ``torch.export`` specialises sizes 0 and 1) instead of ``example``'s batch.
        metadata: string pairs stored in the package (``load_package`` returns them).
    """
    from rfdetr_core.atomic_io import atomic_path

    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=max_batch)},) if dynamic_batch else None
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
    traced = time.perf_counter()
    with atomic_path(path) as tmp:
        staging = tmp.with_name(tmp.name + ".pt2")  # torch wants a name ending in .pt2
        try:
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=str(staging),
                inductor_configs={"aot_inductor.metadata": dict(metadata)},
            )
            staging.replace(tmp)
        finally:
            staging.unlink(missing_ok=True)
    return traced - start, time.perf_counter() - traced


def load_package(path: str | os.PathLike, device_index: int = -1) -> tuple[Callable[..., Any], dict[str, str]]:
    """``(callable, metadata)`` of the package ``path``; ``device_index`` picks the CUDA card (-1: current).

    The callable takes the exported inputs and returns the module's outputs (a tuple stays a tuple). Raises
    :class:`AotiDeviceError` for a CUDA package without the opt-in (:func:`check_device_type`, read before
    loading), and whatever torch raises for a file that is not a loadable package (callers turn it into their
    own error).
    """
    check_device_type(package_device_type(path) or "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        package = torch._inductor.aoti_load_package(str(path), device_index=device_index)
    return package, dict(package.get_metadata())


def _weights_digest(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``module``'s parameters and buffers."""
    digest = hashlib.sha256()
    for name, tensor in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cached_package(
    module: nn.Module,
    example: torch.Tensor,
    folder: str | os.PathLike,
    *,
    key: Mapping[str, Any],
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``module`` as a dynamic-batch package in ``folder``, compiled on the first call and loaded afterwards.

    The file is named by a digest of ``module``'s weights, ``key`` (what else the compiled code depends on:
    resolution, dtype, ...), the torch version and the device (its CUDA capability), so changed weights or
    another torch never load a stale package. Returns ``(callable, report)`` with ``report = {"path", "hit":
    bool, "export_seconds", "compile_seconds", "load_seconds"}`` (the first two 0 on a hit).
    """
    device = example.device
    check_device_type(device.type)  # before minutes of compiling
    where = (
        f"cuda-{'.'.join(map(str, torch.cuda.get_device_capability(device)))}" if device.type == "cuda" else "cpu"
    )
    identity = json.dumps(
        {"weights": _weights_digest(module), "torch": torch.__version__, "device": where, **dict(key)},
        sort_keys=True,
        default=str,
    )
    path = Path(folder) / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.pt2"
    report: dict[str, Any] = {"path": str(path), "hit": path.is_file(), "export_seconds": 0.0, "compile_seconds": 0.0}
    if not report["hit"]:
        exported, compiled = compile_package(
            module, example, path, dynamic_batch=True, metadata={"rfdetr_identity": identity}
        )
        report.update(export_seconds=exported, compile_seconds=compiled)
    start = time.perf_counter()
    index = device.index if device.type == "cuda" and device.index is not None else -1
    fn, metadata = load_package(path, device_index=index)
    report["load_seconds"] = time.perf_counter() - start
    if metadata.get("rfdetr_identity") != identity:  # a digest collision or a file replaced by hand
        raise RuntimeError(f"{path} does not hold the package it is named after; delete it and run again")
    return fn, report
