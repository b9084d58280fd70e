"""The served model: what ``MODEL`` names, loaded once, warmed up, and called on batches of uploads.

``MODEL`` is an exported file (``.onnx``, ``.engine``, ``.pt2``: run through the runner that rfdetr-export registers
with core), a weights file (ours or upstream's), or the name of official weights (``seg-nano``). All of them
end up as one :class:`rfdetr_core.RFDETR`, whose ``predict`` is the only model path the server uses: the
response equals ``RFDETR.predict`` on the same image by construction.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("rfdetr_serve")

EXPORTED_SUFFIXES = (".onnx", ".engine", ".pt2")
# --optimize mode (settings.OPTIMIZE_MODES but "off") -> RFDETR.optimize's compile argument
_OPTIMIZE_COMPILE = {"auto": False, "graphs": False, "compile": True, "max-autotune": "max-autotune"}


def graph_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Batch sizes to capture CUDA graphs for when batches hold 1 to ``max_batch`` images: the powers of two
    below ``max_batch`` and ``max_batch`` itself (a batch runs padded to the next one, so at most half a
    batch of padding); e.g. 8 -> (1, 2, 4, 8), 6 -> (1, 2, 4, 6)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


@dataclass
class ImageJob:
    """One image for the model thread: the upload as the request thread decoded it (core's
    ``OpenedImage``, which ``predict`` takes exactly like the file) and the request's score threshold."""

    image: Any
    threshold: float


def load_rfdetr(model: str, device: str | None):
    """``MODEL`` -> an :class:`rfdetr_core.RFDETR` on ``device``.

    Raises :class:`rfdetr_core.errors.RFDETRError` subclasses (missing file, unknown name, offline download)
    with messages for the user.
    """
    from rfdetr_core import RFDETR
    from rfdetr_core.errors import CheckpointError

    path = Path(model)
    if path.suffix.lower() in EXPORTED_SUFFIXES:
        if not path.is_file():
            raise CheckpointError(f"Exported model {model!r} not found; check the path.")
        from_file = getattr(RFDETR, "from_file", None)
        if from_file is None:
            raise CheckpointError(
                f"Serving {path.suffix} files needs rfdetr-core's runner seam (RFDETR.from_file), which this "
                "installation lacks; serve the PyTorch checkpoint instead or upgrade rfdetr-core."
            )
        return from_file(path, device=device) if device else from_file(path)
    if path.exists():
        return RFDETR.from_checkpoint(path, device=device)
    return RFDETR.from_pretrained(model, device=device)


class ServedModel:
    """An ``RFDETR`` plus what the server needs around it. Only the model thread calls :meth:`run_batch`
    and :meth:`warm_up`."""

    def __init__(self, rfdetr, source: str):
        self.rfdetr = rfdetr
        self.source = source
        self.fast_path: dict[str, Any] | None = None  # optimize()'s summary once on the GPU fast path
        self.fast_path_error: str | None = None  # why --optimize auto stayed eager on CUDA

    def optimize(self, mode: str, max_batch: int) -> dict[str, Any] | None:
        """Put the model on core's GPU fast path (``RFDETR.optimize``: bf16 network, float32 selection, CUDA
        graphs) as ``--optimize mode`` asks; returns :attr:`fast_path` (``None`` when it stays eager).

        ``auto`` uses CUDA graphs when the model is a PyTorch one on CUDA and does nothing otherwise; if the
        capture fails there it logs the error, keeps serving the eager float32 model and reports the error in
        :meth:`card` (``fast_path_error``). ``graphs``, ``compile`` and ``max-autotune`` insist: a ``ValueError``
        says why they cannot apply, and a failure stops the server. ``off`` keeps the eager float32 model.
        Graphs are captured for :func:`graph_batch_sizes` of ``max_batch``; the compiled modes compile once per
        batch size, so they capture 1 and ``max_batch`` only.
        """
        r = self.rfdetr
        eligible = getattr(r, "model", None) is not None and r.device.type == "cuda"
        if mode == "off" or (mode == "auto" and not eligible):
            return None
        if mode not in _OPTIMIZE_COMPILE:
            raise ValueError(f"unknown --optimize mode {mode!r}")
        if not eligible:
            raise ValueError(
                f"--optimize {mode} needs a PyTorch model on a CUDA device; this one runs on {self.backend} "
                f"on {r.device}. Serve it with --device cuda, or use --optimize off."
            )
        import torch

        compile_arg = _OPTIMIZE_COMPILE[mode]
        sizes = graph_batch_sizes(max_batch) if compile_arg is False else tuple(sorted({1, max_batch}))
        try:
            report = r.optimize(batch_sizes=sizes, dtype=torch.bfloat16, compile=compile_arg)
        except Exception as exc:
            if mode != "auto":
                raise
            self.fast_path_error = f"{type(exc).__name__}: {exc}"
            log.warning(json.dumps({"event": "fast_path_failed", "error": self.fast_path_error,
                                    "serving": "eager float32", "hint": "--optimize off skips the attempt"}))
            return None
        self.fast_path = {
            "mode": "graphs" if compile_arg is False else mode,
            "dtype": report["dtype"],
            "batch_sizes": list(sizes),
            "setup_seconds": round(float(report["seconds"]), 3),
        }
        return self.fast_path

    @property
    def name(self) -> str:
        return self.rfdetr.variant.name

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.rfdetr.resolution)

    @property
    def backend(self) -> str:
        runner = getattr(self.rfdetr, "runner", None)
        return str(getattr(runner, "backend", "pytorch"))

    def run_batch(self, jobs: Sequence[ImageJob]) -> list[Any]:
        """One ``predict`` call over the batch at the lowest threshold any job asked for; each request then
        keeps ``score > its threshold``, which gives exactly what ``predict`` at that threshold returns (the
        top-k selection does not depend on the threshold, and every kept row is computed the same way)."""
        threshold = min(job.threshold for job in jobs)
        images = [job.image for job in jobs]
        return self.rfdetr.predict(images, threshold=threshold, batch_size=len(images))

    def warm_up(self, max_batch: int) -> None:
        """Run the batch sizes the server will see first (1 and ``max_batch``) so the first requests do not
        pay for allocator growth and kernel selection."""
        import numpy as np
        from PIL import Image

        from rfdetr_core.preprocess import OpenedImage

        h, w = self.resolution
        rng = np.random.default_rng(0)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        buf.seek(0)
        job = ImageJob(OpenedImage.open(buf, self.resolution), 0.5)
        for size in sorted({1, max_batch}):
            self.run_batch([job] * size)

    def card(self) -> dict[str, Any]:
        """What ``GET /model`` reports about the model (the limits and batching are added by the app):
        name, variant, resolution ``[H, W]``, backend, device, the GPU fast path (``None`` when eager), classes,
        the full model card
        (``ModelCard.to_metadata()``: queries, preprocessing, class map, ...), the file's export facts for
        exported files, and the versions of what runs it."""
        from importlib.metadata import PackageNotFoundError, version

        import torch

        import rfdetr_core
        import rfdetr_serve

        r = self.rfdetr
        versions = {
            "rfdetr_serve": rfdetr_serve.__version__,
            "rfdetr_core": rfdetr_core.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        runner = getattr(r, "runner", None)
        if self.backend != "pytorch":  # the exported file's runtime and the package that registered it
            for dist in ("rfdetr-export", self.backend):
                with contextlib.suppress(PackageNotFoundError):  # a runtime without package metadata: no line
                    versions[dist.replace("-", "_")] = version(dist)
        return {
            "name": self.name,
            "source": self.source,
            "variant": self.name,
            "resolution": list(self.resolution),
            "backend": self.backend,
            "device": str(r.device),
            "fast_path": self.fast_path,
            "fast_path_error": self.fast_path_error,
            "classes": [{"category_id": int(c), "name": n}
                        for c, n in zip(r.class_map.category_ids, r.class_map.names)],
            "num_select": int(getattr(runner, "num_select", None) or r.card.default_num_select),
            "card": r.card.to_metadata(),
            "export": getattr(runner, "export_info", None),
            "versions": versions,
        }
