"""The GPU fast path's engine: a module captured as one CUDA graph per batch size, optionally compiled first.

A forward pass of RF-DETR-Seg at batch 1 launches several hundred small kernels; replaying them as a CUDA
graph removes the per-launch CPU cost, which at batch 1 is most of the eager time. Graphs have static
shapes, so one graph is captured per batch size (``batch_sizes``); a batch is run by the smallest graph that
holds it, padded (rows are independent in eval mode, so the padding never changes the real rows), and a
batch larger than every graph runs as several replays. All graphs share one memory pool.

Outputs are cloned out of the graph's static buffers before they are returned, so a result stays valid
after the next call (the clone is a device-to-device copy of a few MB).

``torch.compile`` (``compile=True``) fuses the elementwise work inside the graph; ``compile="max-autotune"``
also lets inductor pick among its own Triton matrix-multiply kernels (with bias and activation fused into them)
and cuBLAS per shape, by timing them once (minutes on a cold machine; the choices are cached). Its artefacts go to the
inductor cache (``TORCHINDUCTOR_CACHE_DIR``; :func:`compile_cache_dir` points it at
``$RFDETR_HOME/compile`` unless already set), so a second process compiles from cache; :class:`CacheReport`
records whether it did (a second process on an H200 was no faster, 2026-12-03, cause unknown).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rfdetr_core.paths import rfdetr_home

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"

# GraphedModule's ``compile`` values -> torch.compile's ``mode``. Never a mode with inductor's own CUDA graphs
# ("reduce-overhead", "max-autotune"): this module captures the graph itself.
COMPILE_MODES = {True: None, "max-autotune": "max-autotune-no-cudagraphs"}


def compile_cache_dir() -> Path:
    """The inductor cache folder used by compiled fast paths: ``$TORCHINDUCTOR_CACHE_DIR`` when set, else
    ``$RFDETR_HOME/compile`` (set for this process so that inductor and a later process agree)."""
    if not os.environ.get(CACHE_ENV):
        os.environ[CACHE_ENV] = str(rfdetr_home() / "compile")
    return Path(os.environ[CACHE_ENV])


# torch's counters of its compile caches: FX graphs (inductor) and AOTAutograd
_CACHE_COUNTERS = {
    "fxgraph_cache_hit": ("inductor", "fxgraph_cache_hit"),
    "fxgraph_cache_miss": ("inductor", "fxgraph_cache_miss"),
    "fxgraph_cache_bypass": ("inductor", "fxgraph_cache_bypass"),
    "autograd_cache_hit": ("aot_autograd", "autograd_cache_hit"),
    "autograd_cache_miss": ("aot_autograd", "autograd_cache_miss"),
    "autograd_cache_bypass": ("aot_autograd", "autograd_cache_bypass"),
}


def _cache_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {name: int(counters[group][key]) for name, (group, key) in _CACHE_COUNTERS.items()}


@dataclass
class CacheReport:
    """What torch's compile caches did while the block of :meth:`watch` ran: hits, misses and bypasses of the
    inductor FX-graph cache and the AOTAutograd cache, and the reasons torch logged for each bypass.

    A second process that compiles the same module should show hits and no misses; misses or bypasses there
    explain a cold start that the cache did not shorten."""

    counts: dict[str, int] = field(default_factory=dict)
    bypass_reasons: list[str] = field(default_factory=list)

    class _Reasons(logging.Handler):
        def __init__(self, sink: list[str]) -> None:
            super().__init__(logging.DEBUG)
            self.sink = sink

        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            # "Bypassing FX Graph Cache because ...", "Bypassing autograd cache due to: ..."
            if "bypass" in message.lower() and message not in self.sink:
                self.sink.append(message)

    @classmethod
    def watch(cls, fn: Callable[[], Any]) -> tuple[Any, CacheReport]:
        """``(fn(), report)``: run ``fn`` and report the compile caches' activity during it."""
        report = cls()
        handler = cls._Reasons(report.bypass_reasons)
        loggers = [
            logging.getLogger(name)
            for name in ("torch._inductor.codecache", "torch._functorch._aot_autograd.autograd_cache")
        ]
        levels = [lg.level for lg in loggers]
        before = _cache_counts()
        for lg in loggers:
            lg.addHandler(handler)
            lg.setLevel(min(lg.getEffectiveLevel(), logging.INFO))
        try:
            result = fn()
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.removeHandler(handler)
                lg.setLevel(level)
        after = _cache_counts()
        report.counts = {k: after[k] - before[k] for k in after}
        return result, report

    def to_dict(self) -> dict[str, Any]:
        return {**self.counts, "bypass_reasons": list(self.bypass_reasons)}


def graph_pools(device: torch.device | int | None = None) -> dict[tuple[int, int], tuple[int, int]]:
    """Bytes held by each CUDA-graph private memory pool of ``device``: ``{pool id: (reserved, allocated)}``.

    A graph's replay writes its intermediates into its pool without asking the caching allocator, so
    ``torch.cuda.max_memory_allocated`` misses the part of the pool the allocator counts as free
    (``reserved - allocated``); a peak that includes graphs adds it. Empty without CUDA. Walks the
    allocator's segments (``torch.cuda.memory_snapshot``): milliseconds, not for every step.
    """
    if not torch.cuda.is_available():
        return {}
    index = None if device is None else torch.device(device).index  # an int is a CUDA index
    if index is None:
        index = torch.cuda.current_device()
    pools: dict[tuple[int, int], tuple[int, int]] = {}
    for seg in torch.cuda.memory_snapshot():
        pool = tuple(seg.get("segment_pool_id", (0, 0)))
        if seg.get("device") != index or pool == (0, 0):  # (0, 0): the allocator's ordinary pool
            continue
        reserved, allocated = pools.get(pool, (0, 0))
        pools[pool] = (reserved + int(seg["total_size"]), allocated + int(seg["allocated_size"]))
    return pools


def _clone(tree: Any, rows: int) -> Any:
    """First ``rows`` rows of every tensor in a tuple/list/dict of tensors, as fresh copies."""
    if isinstance(tree, torch.Tensor):
        return tree[:rows].clone()
    if isinstance(tree, dict):
        return {k: _clone(v, rows) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(v, rows) for v in tree)
    return tree


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    return first


class GraphedModule:
    """``module`` (input ``[B, 3, H, W]``) replayed from CUDA graphs captured for ``batch_sizes``.

    Args:
        module: eval-mode module on a CUDA device, already in its run dtype; its output is a tensor or a
            tuple/list/dict of tensors whose first dimension is the batch.
        image_size: ``(H, W)`` of the input.
        batch_sizes: batch sizes to capture (at least one).
        dtype: input dtype of the module (inputs are cast into the static buffer on copy).
        compile: wrap the module in ``torch.compile`` (static shapes, one compile per batch size) first:
            ``True`` (inductor's default mode) or ``"max-autotune"`` (autotuned matrix multiplies; see the module
            docstring); ``False``: capture it as it is.
        warmup: eager (or compiling) runs before each capture.
        then: run on the module's outputs (unpacked when a tuple) inside the same graph, never compiled:
            ``RFDETR.optimize`` passes the graph-safe selection here, which inductor (torch 2.11) failed to
            compile on CUDA and which gains nothing from it once captured.
        device: the CUDA device it runs on (default: that of ``module``'s parameters, else the current one);
            for callables without parameters, such as a loaded AOTInductor package.

    Attributes:
        capture_seconds: ``{batch: seconds}`` spent compiling, warming up and capturing each graph.
        cache: with ``compile``, the compile caches' activity over all captures (:class:`CacheReport`).
    """

    def __init__(
        self,
        module: torch.nn.Module | Callable[[torch.Tensor], Any],
        image_size: tuple[int, int],
        batch_sizes: Sequence[int] = (1, 8),
        dtype: torch.dtype = torch.bfloat16,
        compile: bool | str = False,
        warmup: int = 3,
        then: Callable[..., Any] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if compile is not False and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be False, True or 'max-autotune', got {compile!r}")
        sizes = sorted({int(b) for b in batch_sizes})
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch_sizes must be positive integers, got {tuple(batch_sizes)}")
        if device is None:
            owner = getattr(module, "__self__", module)  # a bound method's module
            params = next(iter(owner.parameters()), None) if isinstance(owner, torch.nn.Module) else None
            device = params.device if params is not None else torch.device("cuda")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the module on a CUDA device, it is on {device}")
        self.device = device
        self.dtype = dtype
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.compiled = compile is not False
        if compile is not False:
            compile_cache_dir()
            fn = torch.compile(module, dynamic=False, mode=COMPILE_MODES[compile])
        else:
            fn = module
        if then is not None:
            stage = fn

            def fn(images: torch.Tensor) -> Any:
                out = stage(images)
                return then(*out) if isinstance(out, tuple) else then(out)

        self._fn = fn
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]] = {}
        self.capture_seconds: dict[int, float] = {}

        def capture_all() -> None:
            # largest first: the shared pool is sized by the first capture, the smaller ones fit in it
            for batch in reversed(sizes):
                start = time.perf_counter()
                self._graphs[batch] = self._capture(batch, warmup)
                torch.cuda.synchronize(device)
                self.capture_seconds[batch] = time.perf_counter() - start

        self.cache: CacheReport | None = None
        if self.compiled:
            _, self.cache = CacheReport.watch(capture_all)
        else:
            capture_all()
        self.batch_sizes = tuple(sizes)

    @torch.inference_mode()
    def _capture(self, batch: int, warmup: int):
        h, w = self.image_size
        static_in = torch.randn(batch, 3, h, w, device=self.device).to(self.dtype)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                self._fn(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self._fn(static_in)
        return graph, static_in, static_out

    def graph_for(self, batch: int) -> int:
        """The captured batch size that runs ``batch`` rows (the smallest that holds them, else the largest)."""
        for size in self.batch_sizes:
            if size >= batch:
                return size
        return self.batch_sizes[-1]

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> Any:
        """``images [B, 3, H, W]`` (any float dtype, on the module's device) -> the module's outputs for the
        B rows, as fresh tensors."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, *self.image_size):
            raise ValueError(
                f"expected images [B, 3, {self.image_size[0]}, {self.image_size[1]}], got {tuple(images.shape)}"
            )
        total = images.shape[0]
        parts = []
        start = 0
        while start < total:
            size = self.graph_for(total - start)
            rows = min(size, total - start)
            graph, static_in, static_out = self._graphs[size]
            static_in[:rows].copy_(images[start : start + rows])
            graph.replay()
            parts.append(_clone(static_out, rows))
            start += rows
        return parts[0] if len(parts) == 1 else _concat(parts)
