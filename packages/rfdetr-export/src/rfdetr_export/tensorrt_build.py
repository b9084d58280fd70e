"""ONNX -> TensorRT engine with the TensorRT Python API (extra ``trt``), and the card beside it.

The network is **strongly typed** (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, TensorRT >= 10): every
layer runs in the precision its ONNX tensors have, so ``--half`` means an fp16 ONNX graph
(:mod:`rfdetr_export.half`), never a builder flag (TensorRT 11 removed ``BuilderFlag.FP16``; rf-detr#1453
shows upstream silently building fp32 engines when asked for fp16). Before building, the share of compute
layers whose output is fp16 is counted; an engine is called fp16 only when at least
:data:`MIN_FP16_SHARE` of them are (rf-detr#1453 measured 88.76 % Half layers in a working fp16 engine).

One optimisation profile covers ``min_batch..max_batch`` tuned for ``opt_batch``. The card and build facts
(TensorRT version, GPU name and compute capability, batch range, precision, fp16 share) go to
``<engine>.json``; :class:`rfdetr_export.runtime.TensorRTModel` refuses an engine whose sidecar names another
GPU or TensorRT version.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from rfdetr_core.errors import MissingDependencyError, RFDETRError

MIN_FP16_SHARE = 0.8
SIDECAR_SUFFIX = ".json"
# Layer types that move or describe data rather than compute on it (not counted in the fp16 share).
_PLUMBING_LAYERS = {
    "CONSTANT",
    "SHUFFLE",
    "SHAPE",
    "SLICE",
    "CONCATENATION",
    "GATHER",
    "IDENTITY",
    "CAST",
    "ASSERTION",
    "CONDITION",
    "CONDITIONAL_INPUT",
    "CONDITIONAL_OUTPUT",
    "FILL",
    "SQUEEZE",
    "UNSQUEEZE",
}


class TensorRTBuildError(RFDETRError):
    """The engine could not be built as asked; the message says why."""


def import_tensorrt():
    """``tensorrt``, or an error naming the extra (NVIDIA's wheels; not installed by default)."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(
            "--trt needs NVIDIA TensorRT (>= 10): pip install 'rfdetr-export[trt]' on a machine with a CUDA GPU "
            "(the wheels download the libraries from NVIDIA's index)."
        ) from exc
    return tensorrt


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile's batch range."""

    min_batch: int
    opt_batch: int
    max_batch: int

    def __post_init__(self):
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise TensorRTBuildError(
                f"batch profile must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch, got "
                f"{self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )


def gpu_identity() -> dict:
    """Name and compute capability of the current CUDA device (what an engine is tied to)."""
    import torch

    if not torch.cuda.is_available():
        return {"gpu": None, "compute_capability": None}
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def network_fp16_share(trt, network) -> float:
    """Share of floating-point compute layers (not shuffles, constants, casts, ...; not index or boolean
    arithmetic) whose first output is fp16."""
    floats = {trt.DataType.FLOAT, trt.DataType.HALF, getattr(trt.DataType, "BF16", trt.DataType.HALF)}
    half = total = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if str(layer.type).rsplit(".", 1)[-1] in _PLUMBING_LAYERS or layer.num_outputs == 0:
            continue
        dtype = layer.get_output(0).dtype
        if dtype not in floats:
            continue
        total += 1
        half += dtype == trt.DataType.HALF
    return half / total if total else 0.0


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    input_name: str,
    resolution: tuple[int, int],
    profile: BatchProfile,
    half: bool,
    card_metadata: dict,
    workspace_gb: float | None = None,
    plugins: bool = False,
) -> dict:
    """Build ``engine_path`` (+ ``.json`` sidecar) from ``onnx_path``; returns the sidecar's content.

    Raises :class:`TensorRTBuildError` when parsing or building fails, or when ``half`` is asked for but
    fewer than :data:`MIN_FP16_SHARE` of the compute layers are fp16 (the ONNX graph was not exported with
    ``--half``).
    """
    trt = import_tensorrt()
    from rfdetr_core.atomic_io import atomic_write_bytes, atomic_write_text

    logger = trt.Logger(trt.Logger.WARNING)
    if plugins:
        trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTBuildError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors) or 'unknown error'}")
    share = network_fp16_share(trt, network)
    if half and share < MIN_FP16_SHARE:
        raise TensorRTBuildError(
            f"only {share:.0%} of the network's compute layers are fp16 (< {MIN_FP16_SHARE:.0%}): this is not an "
            "fp16 engine. Export the ONNX graph with --half (precision lives in the graph: strongly typed)."
        )
    if not half and share > 0.5:
        raise TensorRTBuildError(
            f"{share:.0%} of the layers are fp16 but --half was not given; pass --half to build an fp16 engine."
        )
    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    height, width = resolution
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(
        input_name,
        (profile.min_batch, 3, height, width),
        (profile.opt_batch, 3, height, width),
        (profile.max_batch, 3, height, width),
    )
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT failed to build an engine from {onnx_path} (see its log above).")
    engine_path = Path(engine_path)
    sidecar = {
        "card": card_metadata,
        "tensorrt": trt.__version__,
        **gpu_identity(),
        "precision": "float16" if half else "float32",
        "fp16_layer_share": round(share, 4),
        "profile": asdict(profile),
        "input": input_name,
        "onnx": Path(onnx_path).name,
    }
    atomic_write_bytes(engine_path, bytes(serialized))
    atomic_write_text(sidecar_path(engine_path), json.dumps(sidecar, indent=2, sort_keys=True))
    return sidecar


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """The card sidecar of an engine: ``model.engine`` -> ``model.json`` beside it."""
    return Path(engine_path).with_suffix(SIDECAR_SUFFIX)
