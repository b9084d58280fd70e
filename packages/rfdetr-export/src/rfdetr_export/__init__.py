"""rfdetr-export: RF-DETR-Seg models to ONNX (and TensorRT engines), with runtimes that plug into rfdetr-core."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rfdetr-export")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
