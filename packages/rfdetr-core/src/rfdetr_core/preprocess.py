"""The one pre-processing path, shared by predict, validation, export and serve.

Input types (see :func:`to_float_rgb`):

* a path (``str`` / ``os.PathLike``) to an image file, or a binary file object (``io.BytesIO``) holding one,
* a ``PIL.Image`` of any mode (greyscale, RGBA, palette, 16-bit ``I;16``),
* a numpy array, **RGB** ``HxWx3`` (or ``HxW`` / ``HxWx1`` greyscale, ``HxWx4`` RGBA), dtype uint8,
  uint16 or float in [0, 1],
* a torch tensor ``[3,H,W]`` (or ``[1,H,W]``), uint8 or float in [0, 1],
* an :class:`OpenedImage`: a file already decoded by :meth:`OpenedImage.open` (e.g. in a server's decode
  thread), treated exactly like the file it came from (same pixels, the file's own size).

Fixed rules: greyscale is repeated to three channels; alpha is dropped; integer images are divided by the
maximum of their dtype (8-bit by 255, **16-bit by 65535**), so 16-bit data keep their full range.
The resize and normalisation settings are a :class:`PreprocessConfig`, recorded in every checkpoint and
export so that all paths see the same pixels.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from rfdetr_core.errors import ImageError

# ``np.asarray(pil_image)`` is read-only, and torch warns when it wraps such an array. The uint8 fast path below
# only reads that view (the first operation on it makes a new tensor), so the warning would be noise in every
# user's log (once per process): ignored for warnings raised from this module only.
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", category=UserWarning, module=r"rfdetr_core\.preprocess"
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("stretch",)


@dataclass(frozen=True)
class PreprocessConfig:
    """How images become model input.

    ``resize="stretch"`` resizes straight to the model's ``H x W`` (no letterbox, as upstream RF-DETR
    trains and predicts); ``antialias`` low-pass filters when shrinking (bilinear).
    """

    resize: str = "stretch"
    interpolation: str = "bilinear"
    antialias: bool = True
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(
                f"interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}"
            )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> PreprocessConfig:
        if not data:
            return cls()
        unknown = set(data) - {"resize", "interpolation", "antialias", "mean", "std"}
        if unknown:
            raise ValueError(f"Unknown preprocessing keys {sorted(unknown)}")
        d = dict(data)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        return cls(**d)


def open_image(path: str | os.PathLike | BinaryIO, min_size: tuple[int, int] | None = None):
    """Open an image file (a path, or a binary file object such as ``io.BytesIO(upload)``) as PIL; returns
    ``(image, (source_height, source_width))``.

    With ``min_size`` (H, W), JPEGs are decoded at reduced scale ("draft" mode skips DCT work) while keeping
    at least ``min_size`` pixels per side, so the network input barely changes; the returned source size is
    always the file's own size.
    """
    from PIL import Image, UnidentifiedImageError

    if not hasattr(path, "read"):
        path = Path(path)
    try:
        img = Image.open(path)
        source_size = (img.height, img.width)
        if min_size is not None and img.format == "JPEG" and img.mode in ("RGB", "L"):
            img.draft(img.mode, (int(min_size[1]), int(min_size[0])))
        img.load()
    except FileNotFoundError as exc:
        raise ImageError(f"Image file not found: {path}") from exc
    except (UnidentifiedImageError, OSError) as exc:
        where = path if isinstance(path, Path) else getattr(path, "name", "from the file object")
        raise ImageError(f"Cannot read image {where}: {exc}. Is it a valid image file?") from exc
    return img, source_size


@dataclass(frozen=True)
class OpenedImage:
    """An image file decoded ahead of time: ``image`` is the loaded PIL image that :func:`open_image` gives
    (JPEGs possibly decoded at reduced scale for ``min_size``), ``source_size`` the file's own ``(h, w)``.

    ``predict`` / :func:`preprocess` take it like the file itself: ``predict(OpenedImage.open(f, size))``
    equals ``predict(f)`` when ``size`` is the model's resolution. A server decodes each upload once this way
    (checking it in the request thread) and hands the decoded image to the model thread.
    """

    image: Any
    source_size: tuple[int, int]

    @classmethod
    def open(cls, path: str | os.PathLike | BinaryIO, min_size: tuple[int, int] | None = None) -> OpenedImage:
        """Decode ``path`` (a path or binary file object) now; raises :class:`ImageError` like
        :func:`open_image`."""
        image, source_size = open_image(path, min_size)
        return cls(image, source_size)


def _pil_to_array(img) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.uint16)
    if mode == "I":  # 32-bit int PIL mode, used for 16-bit PNGs by some PIL versions
        arr = np.asarray(img)
        return (
            arr.astype(np.uint16)
            if arr.max(initial=0) <= 65535
            else arr.astype(np.float32) / float(arr.max())
        )
    if mode == "F":
        return np.asarray(img, dtype=np.float32)
    if mode in ("L", "RGB"):
        return np.asarray(img)
    return np.asarray(img.convert("RGB"))


def _warn_if_0_255(peak: float) -> None:
    """Float images are read as values in [0, 1]; a peak far above 1 means 0-255 values were passed."""
    if peak > 1.5:
        warnings.warn(
            f"A float image has values up to {peak:g}, but float images are read as [0, 1]: values above 1 "
            "saturate. Divide by 255 (or pass the uint8 array) to give the model the pixels you mean.",
            UserWarning,
            stacklevel=4,
        )


def _array_to_float(arr: np.ndarray) -> np.ndarray:
    """numpy image -> float32 ``HxWx3`` in [0, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(
            f"numpy images must be HxW, HxWx1, HxWx3 (RGB) or HxWx4, got shape {arr.shape}. "
            "Channel-first arrays must be transposed to HWC first."
        )
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32) / 65535.0
    elif arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        _warn_if_0_255(float(out.max(initial=0.0)))
    else:
        raise ImageError(f"Unsupported image dtype {arr.dtype}; use uint8, uint16 or float in [0, 1].")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return out


def to_float_rgb(image: Any, min_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Any supported image -> float32 tensor ``[3, H, W]`` in [0, 1] (RGB).

    For paths, ``min_size`` allows reduced-scale JPEG decoding (see :func:`open_image`); use
    :func:`load_image` to also get the file's own size.
    """
    return load_image(image, min_size)[0]


def _decoded(image: Any, min_size: tuple[int, int] | None) -> tuple[Any, tuple[int, int] | None]:
    """Files (paths, binary file objects) decoded with :func:`open_image`, an :class:`OpenedImage` unpacked:
    ``(image, the file's (h, w))``; anything else is returned as it is with ``None`` (its size is its own)."""
    if isinstance(image, OpenedImage):
        return image.image, image.source_size
    if isinstance(image, (str, os.PathLike)) or hasattr(image, "read"):
        return open_image(image, min_size)
    return image, None


def load_image(image: Any, min_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Like :func:`to_float_rgb`, and also the source size ``(h, w)`` (the file's size for paths and binary
    file objects, which are decoded exactly like paths)."""
    image, source_size = _decoded(image, min_size)
    t = _to_tensor(image)
    return t, source_size or (int(t.shape[1]), int(t.shape[2]))


def _to_tensor(image: Any) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ImageError(f"Tensor images must be [3,H,W] (or [1,H,W]), got shape {tuple(image.shape)}.")
        t = t[:3]
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        elif t.dtype == torch.uint16:
            t = t.float() / 65535.0
        elif t.is_floating_point():
            t = t.float()
            _warn_if_0_255(float(t.max()) if t.numel() else 0.0)
        else:
            raise ImageError(f"Unsupported tensor dtype {t.dtype}; use uint8 or float in [0, 1].")
        return t.expand(3, -1, -1) if t.shape[0] == 1 else t
    if isinstance(image, np.ndarray):
        arr = _array_to_float(image)
    else:
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - pillow is a dependency
            Image = None
        if Image is None or not isinstance(image, Image.Image):
            raise ImageError(
                f"Unsupported image input of type {type(image).__name__}: pass a file path, PIL image, "
                "numpy HxWx3 RGB array or a [3,H,W] tensor."
            )
        arr = _array_to_float(_pil_to_array(image))
    # HWC -> CHW
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _to_unit_float(t: torch.Tensor) -> torch.Tensor:
    """``uint8``/``uint16`` -> float32 in [0, 1] by the fixed rule (divide by the dtype's maximum); floats
    pass as float32."""
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.dtype == torch.uint16:
        return t.float() / 65535.0
    return t.float()


_NORM_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(config: PreprocessConfig, dtype: torch.dtype, device: torch.device):
    """``[1, 3, 1, 1]`` mean and std on ``device``, made once per (config, dtype, device): building them
    per call would be two host-to-device copies per batch."""
    key = (config.mean, config.std, dtype, str(device))
    if key not in _NORM_CACHE:
        mean = torch.tensor(config.mean, dtype=dtype, device=device).view(1, 3, 1, 1)
        std = torch.tensor(config.std, dtype=dtype, device=device).view(1, 3, 1, 1)
        _NORM_CACHE[key] = (mean, std)
    return _NORM_CACHE[key]


def resize_normalize(
    image: torch.Tensor, size: tuple[int, int], config: PreprocessConfig = PreprocessConfig()
) -> torch.Tensor:
    """``[3,h,w]`` or ``[B,3,h,w]`` float in [0,1] -> normalised ``[B,3,H,W]`` at ``size = (H, W)``.

    Runs on the image's device (on a GPU: resize and normalisation there, no host copy)."""
    x = image[None] if image.ndim == 3 else image
    if tuple(x.shape[-2:]) != tuple(size):
        kwargs = {"align_corners": False} if config.interpolation != "nearest" else {}
        aa = config.antialias and config.interpolation != "nearest"
        x = F.interpolate(x, size=tuple(size), mode=config.interpolation, antialias=aa, **kwargs)
    mean, std = _mean_std(config, x.dtype, x.device)
    return (x - mean) / std


def _device_ready(item: Any, min_size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image as a ``[3, h, w]`` tensor still in its integer dtype where it has one (uint8 travels to the
    device as 1 byte per value, not 4), and its source size. Same pixels as :func:`load_image`."""
    if isinstance(item, torch.Tensor) and item.dtype in (torch.uint8, torch.uint16):
        t = item.detach()
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ImageError(f"Tensor images must be [3,H,W] (or [1,H,W]), got shape {tuple(item.shape)}.")
        t = t[:3]
        t = t.expand(3, -1, -1) if t.shape[0] == 1 else t
        return t, (int(t.shape[1]), int(t.shape[2]))
    item, source_size = _decoded(item, min_size)  # same rule as load_image
    arr = None
    if isinstance(item, np.ndarray):
        arr = item
    elif not isinstance(item, torch.Tensor):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - pillow is a dependency
            Image = None
        if Image is not None and isinstance(item, Image.Image) and item.mode in ("RGB", "L"):
            arr = np.asarray(item)
    if arr is not None and arr.dtype == np.uint8 and arr.ndim in (2, 3):
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.shape[2] in (1, 3, 4):
            hwc = np.ascontiguousarray(arr[:, :, :3])
            if not hwc.flags.writeable:
                # read-only arrays (np.asarray of a PIL image is one) make torch warn, although nothing writes to
                # them here; a copy costs little next to decoding the image
                hwc = hwc.copy()
            t = torch.from_numpy(hwc).permute(2, 0, 1)  # HWC -> CHW view
            t = t.expand(3, -1, -1) if t.shape[0] == 1 else t
            return t, source_size or (int(t.shape[1]), int(t.shape[2]))
    t = _to_tensor(item)
    return t, source_size or (int(t.shape[1]), int(t.shape[2]))


def _to_device(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """Host tensor -> ``device``; host-to-GPU copies go through pinned memory without blocking."""
    if device is None or t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.contiguous().pin_memory().to(device, non_blocking=True)
    return t.to(device)


def preprocess(
    images: Any | Sequence[Any],
    size: tuple[int, int],
    config: PreprocessConfig = PreprocessConfig(),
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Images -> model input ``[B, 3, H, W]`` (normalised) and their source sizes ``[(h, w), ...]``.

    ``images`` is one image or a list of them (any type :func:`to_float_rgb` takes); a 4-d tensor is a batch.
    With a ``device``, integer images are copied there as integers and converted, resized and normalised
    on the device; consecutive images of one size are resized in one call.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        items: list[Any] = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if not items:
        raise ImageError("No images given.")
    dev = torch.device(device) if device is not None else None
    loaded = [_device_ready(item, size) for item in items]
    sizes = [source_size for _, source_size in loaded]
    batch: list[torch.Tensor] = []
    start = 0
    while start < len(loaded):
        # a run of images with one shape and dtype: one stack, one conversion, one resize
        first = loaded[start][0]
        end = start + 1
        while (
            end < len(loaded) and loaded[end][0].shape == first.shape and loaded[end][0].dtype == first.dtype
        ):
            end += 1
        group = [_to_device(t, dev) for t, _ in loaded[start:end]]
        stacked = group[0][None] if len(group) == 1 else torch.stack(group)  # [n, 3, h, w]
        batch.append(resize_normalize(_to_unit_float(stacked), size, config))
        start = end
    return (batch[0] if len(batch) == 1 else torch.cat(batch)), sizes
