"""rfdetr-core: the RF-DETR-Seg model for inference.

Importing the package registers ``torch.ops.rfdetr.ms_deform_attn`` (see :mod:`rfdetr_core.ops`), which the
model in :mod:`rfdetr_core.models` calls.
"""

from rfdetr_core import ops as _ops  # noqa: F401  (registers torch.ops.rfdetr.*)
from rfdetr_core.class_map import ClassMap
from rfdetr_core.errors import RFDETRError
from rfdetr_core.variants import Variant, get_variant, list_variants

__version__ = "0.2.0"

# The declared surface: the names rfdetr-train, rfdetr-export and rfdetr-serve may import from core (from
# here or from the module named below; tests/core/test_surface.py checks both). Anything else is internal.
_LAZY = {
    # facade, model card, runners, deploy
    "RFDETR": "rfdetr_core.predict",
    "TORCH_SUFFIXES": "rfdetr_core.predict",
    "Detections": "rfdetr_core.detections",
    "ModelCard": "rfdetr_core.model_card",
    "Runner": "rfdetr_core.runner",
    "TorchRunner": "rfdetr_core.runner",
    "runner_from_file": "rfdetr_core.runner",
    "DeployModel": "rfdetr_core.deploy",
    "check_input": "rfdetr_core.deploy",
    "MAX_DYNAMIC_BATCH": "rfdetr_core.deploy",
    # model building and weights
    "create_model": "rfdetr_core.factory",
    "load_model": "rfdetr_core.factory",
    "build_model": "rfdetr_core.factory",
    "card_for": "rfdetr_core.factory",
    "LoadedModel": "rfdetr_core.factory",
    "RFDETRModel": "rfdetr_core.models",
    "WeightsFile": "rfdetr_core.weights.files",
    "read_weights_file": "rfdetr_core.weights.files",
    "resolve_official_name": "rfdetr_core.weights.download",
    "DownloadError": "rfdetr_core.weights.download",
    "save_model": "rfdetr_core.checkpoint",
    "strip_checkpoint": "rfdetr_core.checkpoint",
    "read_metadata": "rfdetr_core.checkpoint",
    # pre- and post-processing, masks, drawing
    "PreprocessConfig": "rfdetr_core.preprocess",
    "preprocess": "rfdetr_core.preprocess",
    "load_image": "rfdetr_core.preprocess",
    "open_image": "rfdetr_core.preprocess",
    "OpenedImage": "rfdetr_core.preprocess",
    "resize_normalize": "rfdetr_core.preprocess",
    "to_float_rgb": "rfdetr_core.preprocess",
    "select_detections": "rfdetr_core.postprocess",
    "default_mask_format": "rfdetr_core.postprocess",
    "finish_detections": "rfdetr_core.postprocess",
    "upsample_masks": "rfdetr_core.postprocess",
    "encode_masks": "rfdetr_core.mask_rle",
    "logits_to_rle": "rfdetr_core.mask_rle",
    "rle_area": "rfdetr_core.mask_rle",
    "decode_counts": "rfdetr_core.mask_rle",
    "compress_counts": "rfdetr_core.mask_rle",
    "crop_runs": "rfdetr_core.mask_rle",
    "runs_to_counts": "rfdetr_core.mask_rle",
    "draw_detections": "rfdetr_core.drawing",
    # deformable-attention backend (export traces the pure-PyTorch samplers)
    "use_backend": "rfdetr_core.ops",
    # AOTInductor packages (rfdetr-export --aoti; the fast path's optimize(compile="aoti"))
    "compile_package": "rfdetr_core.aot_package",
    "load_package": "rfdetr_core.aot_package",
    "AOTI_DEVICE_KEY": "rfdetr_core.aot_package",
    "AotiDeviceError": "rfdetr_core.aot_package",
    "check_device_type": "rfdetr_core.aot_package",
    # CUDA graphs (the trainer counts their private memory pools in its peak-memory log)
    "graph_pools": "rfdetr_core.cuda_graphs",
    # errors, files, folders
    "CheckpointError": "rfdetr_core.errors",
    "ImageError": "rfdetr_core.errors",
    "InvalidResolutionError": "rfdetr_core.errors",
    "MissingDependencyError": "rfdetr_core.errors",
    "require": "rfdetr_core.errors",
    "first_line": "rfdetr_core.errors",
    "atomic_path": "rfdetr_core.atomic_io",
    "atomic_write_text": "rfdetr_core.atomic_io",
    "atomic_write_bytes": "rfdetr_core.atomic_io",
    "datasets_dir": "rfdetr_core.paths",
}

__all__ = ["ClassMap", "RFDETRError", "Variant", "__version__", "get_variant", "list_variants", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rfdetr_core' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
