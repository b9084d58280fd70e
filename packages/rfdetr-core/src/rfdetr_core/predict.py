"""The ``RFDETR`` facade: load a model once, then ``predict`` on paths, PIL images, arrays or tensors.

::

    model = RFDETR.from_pretrained("seg-medium")          # official COCO weights (downloaded once)
    dets = model.predict("street.jpg", threshold=0.5)     # one Detections
    dets.save("street_pred.jpg"); coco = dets.to_coco(image_id=1)

The facade holds a *runner* (:mod:`rfdetr_core.runner`): :class:`~rfdetr_core.runner.TorchRunner` over a
:class:`~rfdetr_core.deploy.DeployModel` by default, or an ONNX Runtime / TensorRT runner from rfdetr-export
(:meth:`RFDETR.from_file`, :meth:`RFDETR.from_runner`). Images pass through
:func:`rfdetr_core.preprocess.preprocess` (the one preprocessing path, with the card's settings), the runner,
which ends in the graph-safe half of post-processing (:func:`rfdetr_core.postprocess.select_detections`: the
top ``num_select`` pairs), and the host half (:func:`rfdetr_core.postprocess.finish_detections`): detections
at or below the threshold and those whose slot maps to no class are dropped before masks are upsampled, and
everything returned is in source-image pixels.

On CUDA, masks leave the device as COCO RLE by default (``mask_format="auto"``): moving dense full-size bool
masks to the host costs far more than the network (seg-medium, 8 images of 640x480: 323 ms of 387). The
``Detections`` decode them on first access to ``.masks``. ``mask_format="bool"`` copies dense masks instead.

:meth:`RFDETR.optimize` switches on the GPU fast path: a low-precision copy of the model, optionally compiled,
replayed from one CUDA graph per batch size (:mod:`rfdetr_core.cuda_graphs`).
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rfdetr_core.detections import Detections
from rfdetr_core.errors import ImageError
from rfdetr_core.factory import LoadedModel, load_model
from rfdetr_core.postprocess import default_mask_format, finish_detections
from rfdetr_core.preprocess import preprocess

MASK_FORMATS = ("auto", "bool", "rle")
OPTIMIZE_COMPILE = (True, False, "max-autotune", "aoti")  # optimize()'s compile values (its docstring)
TORCH_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class RFDETR:
    """An RF-DETR(-Seg) model ready for inference.

    Build it with :meth:`from_pretrained` (official weights), :meth:`from_checkpoint` (any weights file) or
    ``RFDETR(variant)`` (random weights, for tests and benchmarks: it warns that it is untrained).

    Args:
        variant: registered variant name, e.g. ``"seg-nano"``.
        num_classes: logit slots (default: the variant's 91-slot COCO layout).
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
        dtype: model precision (default float32; ``torch.float16`` / ``torch.bfloat16`` on GPUs and CPUs).
        resolution: input ``(H, W)`` or one int (default: the weights' or the variant's).
    """

    def __init__(
        self,
        variant: str = "seg-nano",
        num_classes: int | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        resolution: int | tuple[int, int] | None = None,
    ):
        warnings.warn(
            f"RFDETR({variant!r}) has random, untrained weights: its predictions are noise. Use "
            "RFDETR.from_pretrained(name) or RFDETR.from_checkpoint(path) for a trained model.",
            UserWarning,
            stacklevel=2,
        )
        loaded = load_model(variant, num_classes, None)
        self._setup(loaded, device, dtype, resolution)

    @classmethod
    def _from_loaded(cls, loaded: LoadedModel, device, dtype, resolution) -> RFDETR:
        self = cls.__new__(cls)
        self._setup(loaded, device, dtype, resolution)
        return self

    def _setup(self, loaded: LoadedModel, device, dtype, resolution) -> None:
        from rfdetr_core.runner import TorchRunner

        device = _resolve_device(device)
        model = loaded.model.to(device=device, dtype=dtype or torch.float32).eval()
        card = loaded.card
        if resolution is not None:
            if isinstance(resolution, int):
                resolution = (resolution, resolution)
            res = loaded.variant.check_resolution(int(resolution[0]), int(resolution[1]))
            card = card.replace(resolution=res)
        else:
            loaded.variant.check_resolution(*card.resolution)
        self._use_runner(TorchRunner(model, card), model=model, weights_path=loaded.source)

    @classmethod
    def from_runner(cls, runner) -> RFDETR:
        """A facade over any runner (:mod:`rfdetr_core.runner`): ONNX Runtime or TensorRT from rfdetr-export,
        or a :class:`~rfdetr_core.runner.TorchRunner`. ``predict``, ``Detections``, drawing and ``to_coco``
        work the same; :meth:`optimize` and ``.model`` exist for the torch runner only."""
        self = cls.__new__(cls)
        self._use_runner(runner, model=getattr(runner, "model", None), weights_path=None)
        return self

    @classmethod
    def from_file(cls, path: str | os.PathLike, **options) -> RFDETR:
        """Any model file, the runner chosen by suffix: PyTorch weights (``.safetensors``, ``.pth``, ``.pt``,
        ``.ckpt``) through :meth:`from_checkpoint`, other suffixes (``.onnx``, ``.engine``) through the runner
        registered for them in the ``rfdetr_core.runners`` entry-point group (rfdetr-export); ``options`` go to
        that loader (``device``, ...)."""
        from pathlib import Path

        from rfdetr_core.runner import runner_from_file

        if Path(path).suffix.lower() in TORCH_SUFFIXES:
            return cls.from_checkpoint(path, **options)
        return cls.from_runner(runner_from_file(path, **options))

    def _use_runner(self, runner, model, weights_path) -> None:
        from rfdetr_core.variants import get_variant

        self.runner = runner
        self.card = runner.card
        self.model = model
        self.device = torch.device(runner.device)
        self.dtype = getattr(runner, "dtype", torch.float32)
        self.variant = get_variant(self.card.variant)
        self.class_map = self.card.class_map
        self.preprocess_config = self.card.preprocess
        self.resolution = self.card.resolution
        self.weights_path = weights_path
        self._runners = {getattr(runner, "num_select", self.card.default_num_select): runner}
        self._cat_to_slot = {e.category_id: e.slot for e in self.class_map.entries}
        table = self.class_map.slot_to_category_table()
        self._slot_category = torch.tensor(table, dtype=torch.int64)  # [K], -1 = no class
        self._slot_valid = self._slot_category >= 0
        self._slot_names = [self.class_map.name(s) or "" for s in range(len(table))]
        self._graphed = None  # set by optimize(), with _graphed_num_select
        self._graphed_num_select = 0

    @torch.inference_mode()
    def optimize(
        self,
        batch_sizes: Sequence[int] = (1, 8),
        dtype: torch.dtype = torch.bfloat16,
        compile: bool | str = True,
        num_select: int | None = None,
    ) -> dict[str, Any]:
        """Switch ``predict`` to the GPU fast path; returns its cold-start report.

        A ``dtype`` copy of the model (bf16 or fp16) is wrapped in a :class:`~rfdetr_core.deploy.DeployModel`
        that ends in the graph-safe selection run in float32 (sigmoid, top-K, boxes, the K picked mask
        logits: the same float32 rule as eager predict), and the whole is captured as one CUDA graph per
        batch size (the network after ``torch.compile`` when ``compile``, the selection eager; the compile cache
        lives in ``$RFDETR_HOME/compile``, so a second process compiles faster); batches of other sizes run padded to the next captured size. The
        eager model stays as it was (``self.model``).

        Args:
            batch_sizes: batch sizes to capture a graph for.
            dtype: the network's dtype (``torch.bfloat16``, ``torch.float16`` or ``torch.float32``).
            compile: ``True``: ``torch.compile`` the network before capturing (Dynamo traces it in every process;
                the inductor cache only spares code generation). ``"max-autotune"``: the same with inductor's
                max-autotune (its Triton matrix multiplies with fused bias and activation, or cuBLAS, chosen per
                shape by timing them: minutes on a cold machine, cached for later processes; experimental, not
                yet timed on a GPU). ``"aoti"``: an AOTInductor package of the
                network (:func:`rfdetr_core.aot_package.cached_package`, dynamic batch) compiled once into
                ``$RFDETR_HOME/compile/aoti`` and loaded by later processes without tracing. ``False``: capture
                the eager network.
            num_select: top (query, class) pairs the graph keeps per image (default: the model's query count,
                ``predict``'s default); ``predict(num_select=N)`` on the fast path needs ``N <=`` this.

        Returns:
            ``{"seconds": total, "capture_seconds": {batch: s}, "compiled": the compile argument, "dtype": str,
            "num_select": K, "compile_cache": hits, misses and bypass reasons of torch's compile caches (None
            without compile; :class:`rfdetr_core.cuda_graphs.CacheReport`), "package": with ``"aoti"``, the
            package's path, whether it was found (``hit``) and its export / compile / load seconds}``.
        """
        if self.model is None:
            raise ValueError(
                f"optimize() works on the torch runner; this model runs on {self.runner.backend}."
            )
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
        if compile not in OPTIMIZE_COMPILE:
            raise ValueError(f"compile must be one of {OPTIMIZE_COMPILE}, got {compile!r}")
        if self.device.type != "cuda":
            raise ValueError(
                f"optimize() needs a CUDA device (the model is on {self.device}); the eager path is the "
                "CPU path."
            )
        from rfdetr_core.cuda_graphs import GraphedModule
        from rfdetr_core.deploy import DeployModel

        k = int(self.card.num_queries if num_select is None else num_select)
        start = time.perf_counter()
        network = copy.deepcopy(self.model).to(dtype=dtype).eval()
        module = DeployModel(network, self.card, num_select=k, selection_dtype=torch.float32)
        network_fn, package = module.network_outputs, None
        if compile == "aoti":
            from rfdetr_core.aot_package import cached_package
            from rfdetr_core.cuda_graphs import compile_cache_dir
            from rfdetr_core.ops import use_backend

            h, w = self.resolution
            example = torch.randn(2, 3, h, w, device=self.device, dtype=dtype)  # 2: a dynamic batch axis
            # traced with the pure-PyTorch gather sampler: inductor fuses it, and a package cannot call the
            # JIT-built csrc kernel
            with use_backend("gather"):
                network_fn, package = cached_package(
                    DeployModel(network, self.card, postprocess=False).eval(),  # forward = network_outputs
                    example,
                    compile_cache_dir() / "aoti",
                    key={"card": self.card.to_metadata(), "dtype": str(dtype), "sampler": "gather"},
                )
        # the network is compiled, the selection runs eagerly in the same captured graph
        self._graphed = GraphedModule(
            network_fn,
            self.resolution,
            batch_sizes,
            dtype=dtype,
            compile=False if compile in (False, "aoti") else compile,
            then=module.select,
            device=self.device,
        )
        self._graphed_num_select = module.num_select
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "capture_seconds": dict(self._graphed.capture_seconds),
            "compiled": compile,
            "dtype": str(dtype).removeprefix("torch."),
            "num_select": module.num_select,
            "compile_cache": self._graphed.cache.to_dict() if self._graphed.cache is not None else None,
            "package": package,
        }

    @classmethod
    def from_pretrained(
        cls,
        name: str = "seg-nano",
        *,
        accept_license: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        resolution: int | tuple[int, int] | None = None,
    ) -> RFDETR:
        """Official weights by name (``"seg-medium"``, ``"rf-detr-seg-medium.pt"``), downloaded once and
        md5-checked into ``$RFDETR_HOME/weights``. PML-1.0 weights need ``accept_license=True``."""
        from rfdetr_core.weights.download import download_weights, resolve_official_name

        path = download_weights(name, accept_license=accept_license)
        v = resolve_official_name(name)
        loaded = load_model(v, None, path)
        return cls._from_loaded(loaded, device, dtype, resolution)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        variant: str | None = None,
        num_classes: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        resolution: int | tuple[int, int] | None = None,
    ) -> RFDETR:
        """Any weights file: ours (safetensors), upstream ``.pth``/``.pt`` or Lightning ``.ckpt``.

        ``variant`` is needed only when the file does not tell (a bare upstream state dict whose shapes fit
        several variants). Pickles are read with ``torch.load(weights_only=True)``: no code runs.
        """
        loaded = load_model(variant, num_classes, path)
        return cls._from_loaded(loaded, device, dtype, resolution)

    @property
    def fast_path(self):
        """The GPU fast path after :meth:`optimize` (a :class:`~rfdetr_core.cuda_graphs.GraphedModule`), else
        ``None``. Called on a normalised ``[B, 3, H, W]`` batch at :attr:`resolution`, it returns the graph's
        float32 selection ``(scores [B, K], labels [B, K], boxes [B, K, 4] normalised xyxy, masks [B, K, h, w]
        logits)`` as fresh tensors: ``predict`` minus pre- and post-processing (model-only timing)."""
        return self._graphed

    @property
    def class_names(self) -> list[str]:
        return self.class_map.names

    def __repr__(self) -> str:
        return (
            f"RFDETR({self.variant.name}, {len(self.class_map)} classes, {self.resolution[0]}x"
            f"{self.resolution[1]}, {self.device}, {str(self.dtype).removeprefix('torch.')})"
        )

    @torch.inference_mode()
    def predict(
        self,
        source: Any,
        threshold: float = 0.5,
        batch_size: int = 8,
        num_select: int | None = None,
        mask_format: str = "auto",
    ) -> Detections | list[Detections]:
        """Detect and segment objects.

        Args:
            source: one image or a list of them. An image is a path, a ``PIL.Image``, a numpy ``HxWx3`` RGB
                array (uint8, uint16 or float in [0, 1]) or a ``[3, H, W]`` tensor; a ``[B, 3, H, W]``
                tensor is a list of B images.
            threshold: keep detections with score ``> threshold``.
            batch_size: images per forward pass.
            num_select: top (query, class) pairs considered per image (default: the model's query count,
                as upstream).
            mask_format: how masks come back: ``"rle"`` (COCO RLE encoded on the model's device, dense
                masks decoded only when ``.masks`` is read), ``"bool"`` (dense arrays), ``"auto"`` (RLE on
                CUDA, bool on the CPU).

        Returns:
            One :class:`Detections` for a single image; a list (same order) for a list or a 4-d tensor.
            Boxes xyxy and bool masks ``[N, H, W]`` are at each image's source size; ``category_ids`` are
            the dataset's category ids from the class map.
        """
        single = not isinstance(source, (list, tuple)) and not (
            isinstance(source, torch.Tensor) and source.ndim == 4
        )
        items: Sequence[Any] = [source] if single else list(source)
        if not items:
            raise ImageError("predict() got an empty list of images.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(
                f"threshold must be a score in [0, 1], got {threshold}; scores are sigmoid probabilities."
            )
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
        if mask_format == "auto":
            mask_format = default_mask_format(self.device)
        n_select = int(num_select) if num_select is not None else int(self.card.num_queries)
        results: list[Detections] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            results.extend(self._predict_batch(chunk, float(threshold), n_select, mask_format))
        return results[0] if single else results

    def _predict_batch(
        self, items: Sequence[Any], threshold: float, num_select: int, mask_format: str = "bool"
    ) -> list[Detections]:
        x, sizes = preprocess(items, self.resolution, self.preprocess_config, device=self.device)
        if self._graphed is not None:
            if num_select > self._graphed_num_select:
                raise ValueError(
                    f"optimize() captured the top {self._graphed_num_select} pairs per image; predict(num_select="
                    f"{num_select}) needs optimize(num_select={num_select})"
                )
            # (scores, labels, boxes[, masks]) selected in float32 inside the graph, sorted by score
            picked = tuple(t[:, :num_select] for t in self._graphed(x))
        else:
            picked = self._runner_for(num_select)(x)  # (scores, labels, boxes[, masks]), K >= num_select
            picked = tuple(t[:, :num_select] for t in picked)  # K sorted by score: the first num_select
        scores, labels, boxes = picked[:3]
        masks = picked[3] if len(picked) > 3 else None
        per_image = finish_detections(
            scores,
            labels,
            boxes,
            masks,
            sizes,
            threshold=threshold,
            mask_format=mask_format,
            host=True,
        )
        return [self._to_detections(res, size, item) for res, size, item in zip(per_image, sizes, items)]

    def _runner_for(self, num_select: int):
        """The runner keeping at least ``num_select`` pairs (the torch runner is rebuilt for a larger K)."""
        best = max(self._runners)
        if num_select <= best:
            return self._runners[best]
        if not hasattr(self.runner, "with_num_select"):
            raise ValueError(
                f"this {self.runner.backend} model keeps {best} detections per image; num_select={num_select} "
                "needs a model exported with a larger num_select"
            )
        self._runners[num_select] = self.runner.with_num_select(num_select)
        return self._runners[num_select]

    def _to_detections(self, res: dict[str, Any], size: tuple[int, int], item: Any) -> Detections:
        # the runner reports dataset category ids; slots are the class map's (ids are unique)
        slots = torch.tensor([self._cat_to_slot[c] for c in res["labels"].tolist()], dtype=torch.int64)
        masks = res.get("masks")
        return Detections(
            boxes=res["boxes"].float().cpu().numpy().astype(np.float32),
            scores=res["scores"].float().cpu().numpy().astype(np.float32),
            category_ids=self._slot_category[slots].numpy(),
            class_names=[self._slot_names[s] for s in slots.tolist()],
            masks=masks.cpu().numpy() if masks is not None else None,
            slots=slots.numpy(),
            image_size=(int(size[0]), int(size[1])),
            source=item,
            rles=res.get("rles"),
        )
