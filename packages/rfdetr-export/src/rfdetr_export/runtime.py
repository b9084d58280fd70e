"""Runners for exported files: ``.onnx`` through ONNX Runtime, ``.engine`` through TensorRT.

Both implement core's runner seam (:mod:`rfdetr_core.runner`): calling one with a normalised batch
``images [B, 3, H, W]`` float32 returns the deploy graph's tuple ``(scores [B, K] f32, labels [B, K] int64,
boxes [B, K, 4] f32 xyxy in [0, 1], masks [B, K, h, w] f32 logits)`` as torch tensors, and ``.card``,
``.device`` and ``.backend`` say what it runs. They are registered under the entry-point group
``rfdetr_core.runners`` (``.onnx`` -> :class:`OnnxRuntimeModel`, ``.engine`` -> :class:`TensorRTModel`), so
``RFDETR.from_file("model.onnx")`` finds them without core importing this package.

A graph exported with a static batch ``N`` takes any batch: inputs are cut into chunks of ``N`` and the last
chunk is padded (padding rows are dropped from the outputs). An ``--int8`` graph with a dynamic batch is run one
image at a time: its activations are quantized with one range per tensor, so in a batch each image's result
would depend on the other images (and on a 2-core Xeon four single runs were also 12 % faster than one run of
four, seg-medium). A static-batch int8 graph cannot avoid it: its images share ranges with their chunk.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from rfdetr_core.errors import MissingDependencyError, RFDETRError, first_line
from rfdetr_export.onnx_export import INPUT_NAME, ExportError, read_metadata

DEPLOY_OUTPUTS = ("scores", "labels", "boxes", "masks")


class RuntimeLoadError(RFDETRError):
    """An exported file that cannot be run here (corrupt, not ours, or built for other hardware/software)."""


def _card_from_metadata(card_metadata: dict, path: Path):
    from rfdetr_core.errors import CheckpointError
    from rfdetr_core.model_card import ModelCard

    try:
        return ModelCard.from_metadata(card_metadata)
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        raise RuntimeLoadError(
            f"{path}: its rfdetr model card cannot be read ({exc}); export it again."
        ) from exc


def _chunks(images: torch.Tensor, size: int | None, min_rows: int | None = None):
    """Yield ``(chunk [N, 3, H, W], rows)``: chunks of at most ``size`` rows (all rows at once for ``None``), a
    chunk of fewer than ``min_rows`` rows padded up to ``min_rows`` by repeating its last image (``rows`` counts
    the real ones). ``min_rows`` defaults to ``size``: a static-batch graph gets ``size`` rows every time."""
    total = images.shape[0]
    if size is None:
        yield images, total
        return
    min_rows = size if min_rows is None else min_rows
    for start in range(0, total, size):
        chunk = images[start : start + size]
        rows = chunk.shape[0]
        if rows < min_rows:
            pad = chunk[-1:].expand(min_rows - rows, -1, -1, -1)
            chunk = torch.cat([chunk, pad])
        yield chunk, rows


def _run_chunked(
    images: torch.Tensor, size: int | None, run, min_rows: int | None = None
) -> tuple[torch.Tensor, ...]:
    """``run`` (a batch -> a sequence of output tensors) over the :func:`_chunks` of ``images``: the padding rows
    dropped and the chunks' outputs concatenated, so the result holds ``B`` rows per output."""
    parts = [[o[:rows] for o in run(chunk)] for chunk, rows in _chunks(images, size, min_rows)]
    if len(parts) == 1:
        return tuple(parts[0])
    return tuple(torch.cat(list(group)) for group in zip(*parts, strict=True))


def _check_images(images: torch.Tensor, resolution: tuple[int, int], path: Path) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != tuple(resolution):
        raise ValueError(
            f"{path.name} takes images [B, 3, {resolution[0]}, {resolution[1]}], got {tuple(images.shape)}"
        )


def _fused_for_onnxruntime(path: Path) -> str | bytes:
    """What ONNX Runtime loads for ``path``: the file's graph with its GELUs and backbone attentions fused into
    ONNX Runtime's own operators (:mod:`rfdetr_export.ort_fusions`; the file is not changed), or the path
    itself when there is nothing to fuse or the file is not a readable ONNX model (ONNX Runtime then reports
    what is wrong) or keeps its weights in external data files."""
    import onnx

    from rfdetr_export.ort_fusions import fuse_for_onnxruntime

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not protobuf: ONNX Runtime's own error names the problem
        return str(path)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return str(path)
    model, gelus, attentions = fuse_for_onnxruntime(model)
    return model.SerializeToString() if gelus or attentions else str(path)


class OnnxRuntimeModel:
    """An rfdetr-export ``.onnx`` file run by ONNX Runtime.

    ONNX Runtime is handed the file's graph with its GELUs and backbone self-attentions fused into its own
    operators (:mod:`rfdetr_export.ort_fusions`, in memory; the file is not changed): the same function in
    fewer passes (seg-medium float32 ``session.run`` about 12 % faster on a 2-core Xeon, for about 0.9 s more at
    load: reading, fusing and serialising its 126 MiB graph).

    Args:
        path: the ``.onnx`` file (its metadata must hold the model card).
        device: ``"cpu"`` (default) or ``"cuda"``/``"cuda:N"`` (needs ``onnxruntime-gpu``: extra ``gpu``);
            on CUDA, inputs and outputs stay on the GPU through I/O binding.
        threads: intra-op threads (default: ONNX Runtime's choice).
    """

    backend = "onnxruntime"

    def __init__(
        self, path: str | os.PathLike, device: str | torch.device | None = None, threads: int | None = None
    ):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingDependencyError(
                "Running .onnx files needs onnxruntime: pip install 'rfdetr-export[onnx]' "
                "(or 'rfdetr-export[gpu]' for CUDA)."
            ) from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise RuntimeLoadError(f"ONNX file not found: {self.path}")
        self.device = torch.device(device or "cpu")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT's constant-folding notes about fp16 are noise here
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        # Worker threads spin between the operators of one run() (no wake-up latency on each of its ~1,500
        # nodes) and stop spinning when it returns (force_spinning_stop), so they do not hold a core after the
        # call, when the preprocessing and mask upsampling around it need it (~45 ms of a core after every
        # seg-nano call when left spinning). predict end to end, 2-core Xeon, 2026-12-07: seg-medium int8
        # batch 1 396 -> 358 ms, batch 4 1796 -> 1675 ms, float32 batch 4 2799 -> 2719 ms; seg-nano int8
        # batch 1 196 -> 184 ms (against never spinning, upstream's choice).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        providers: list = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MissingDependencyError(
                    "device='cuda' needs ONNX Runtime's CUDA provider: pip install 'rfdetr-export[gpu]' "
                    f"(this onnxruntime {ort.__version__} has {', '.join(ort.get_available_providers())})."
                )
            providers = [
                ("CUDAExecutionProvider", {"device_id": self.device.index or 0}),
                "CPUExecutionProvider",
            ]
        elif self.device.type != "cpu":
            raise ValueError(f"OnnxRuntimeModel runs on 'cpu' or 'cuda', not {self.device}")
        try:
            self.session = ort.InferenceSession(_fused_for_onnxruntime(self.path), options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
            raise RuntimeLoadError(
                f"{self.path} is not a loadable ONNX model ({first_line(exc) or type(exc).__name__}). Export it again."
            ) from exc
        props = self.session.get_modelmeta().custom_metadata_map
        try:
            card_metadata, self.export_info = read_metadata(props)
        except ExportError as exc:
            raise RuntimeLoadError(f"{self.path}: {exc}") from exc
        self.card = _card_from_metadata(card_metadata, self.path)
        inputs = self.session.get_inputs()
        if [i.name for i in inputs] != [INPUT_NAME]:
            raise RuntimeLoadError(
                f"{self.path}: expected one input named {INPUT_NAME!r}, got {[i.name for i in inputs]}"
            )
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        batch_dim = inputs[0].shape[0]
        self.static_batch = batch_dim if isinstance(batch_dim, int) else None
        # rows per session.run: the static batch, one image for a dynamic int8 graph (module docstring), or all
        self._run_rows = self.static_batch or (1 if self.export_info.get("int8") else None)
        self.resolution = tuple(int(s) for s in inputs[0].shape[2:])
        self.raw = self.output_names != DEPLOY_OUTPUTS
        self._output_shapes = [o.shape for o in self.session.get_outputs()]
        self._output_types = [o.type for o in self.session.get_outputs()]

    def __repr__(self) -> str:
        batch = "dynamic" if self.static_batch is None else self.static_batch
        return f"OnnxRuntimeModel({self.path.name}, batch={batch}, {self.device})"

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``images [B, 3, H, W]`` float32 -> the graph's outputs (any graph, ``--raw`` ones too)."""
        _check_images(images, self.resolution, self.path)
        run = self._run_cuda if self.device.type == "cuda" else self._run_cpu
        return _run_chunked(images.float(), self._run_rows, run)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The runner seam: the deploy tuple ``(scores, labels, boxes, masks)``."""
        if self.raw:
            raise RuntimeLoadError(
                f"{self.path.name} is a --raw graph ({', '.join(self.output_names)}): decode its outputs "
                "yourself, or export without --raw to use it with predict/val."
            )
        return self.run(images)

    def _run_cpu(self, chunk: torch.Tensor) -> list[torch.Tensor]:
        feed = {INPUT_NAME: np.ascontiguousarray(chunk.detach().cpu().numpy())}
        return [torch.from_numpy(o) for o in self.session.run(list(self.output_names), feed)]

    def _run_cuda(self, chunk: torch.Tensor) -> list[torch.Tensor]:
        """I/O binding: the input is read from, and outputs written to, torch CUDA tensors (no host copies)."""
        chunk = chunk.to(self.device).contiguous()
        binding = self.session.io_binding()
        index = self.device.index or 0
        binding.bind_input(INPUT_NAME, "cuda", index, np.float32, tuple(chunk.shape), chunk.data_ptr())
        outputs = []
        for name, shape, kind in zip(self.output_names, self._output_shapes, self._output_types, strict=True):
            dims = [chunk.shape[0] if not isinstance(d, int) else d for d in shape]
            dtype = torch.int64 if "int64" in kind else torch.float32
            out = torch.empty(dims, dtype=dtype, device=self.device)
            np_type = np.int64 if dtype == torch.int64 else np.float32
            binding.bind_output(name, "cuda", index, np_type, tuple(dims), out.data_ptr())
            outputs.append(out)
        torch.cuda.current_stream(self.device).synchronize()  # the input must be written before ORT reads it
        self.session.run_with_iobinding(binding)
        return outputs


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise RuntimeLoadError(f"engine tensor of unsupported type {dtype}")
    return table[dtype]


class TensorRTModel:
    """An rfdetr-export ``.engine`` (with its ``.json`` card sidecar) run by TensorRT (extra ``trt``).

    Args:
        path: the ``.engine`` file; ``<stem>.json`` beside it holds the card and the build facts.
        device: a CUDA device (default ``cuda``).
        cuda_graph: capture one CUDA graph per batch size on first use and replay it afterwards (inputs are
            copied into the graph's static buffer; outputs are cloned out of it).

    Calls go through ``execute_async_v3`` on the current torch stream; batches larger than the profile's
    ``max_batch`` are cut into chunks.
    """

    backend = "tensorrt"

    def __init__(
        self, path: str | os.PathLike, device: str | torch.device | None = None, cuda_graph: bool = False
    ):
        import json

        from rfdetr_export.tensorrt_build import gpu_identity, import_tensorrt, sidecar_path

        trt = import_tensorrt()
        self._trt = trt
        self.path = Path(path)
        if not self.path.is_file():
            raise RuntimeLoadError(f"TensorRT engine not found: {self.path}")
        side = sidecar_path(self.path)
        try:
            meta = json.loads(side.read_text())
            card_metadata, built_with, profile = meta["card"], meta["tensorrt"], meta["profile"]
        except FileNotFoundError as exc:
            raise RuntimeLoadError(
                f"{self.path}: its card {side.name} is missing; keep it beside the engine."
            ) from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise RuntimeLoadError(
                f"{side}: not an rfdetr-export engine card ({exc}); build the engine again."
            ) from exc
        if built_with != trt.__version__:
            raise RuntimeLoadError(
                f"{self.path.name} was built with TensorRT {built_with}, this is TensorRT {trt.__version__}: "
                "engines only run on the version that built them; build it again here."
            )
        here = gpu_identity()
        if meta.get("compute_capability") and here["compute_capability"] != meta["compute_capability"]:
            raise RuntimeLoadError(
                f"{self.path.name} was built for {meta.get('gpu')} (compute capability {meta['compute_capability']}), "
                f"this is {here['gpu']} ({here['compute_capability']}): build it again on this GPU."
            )
        self.device = torch.device(device or "cuda")
        if self.device.type != "cuda" and not getattr(trt, "__rfdetr_fake__", False):
            raise ValueError(f"TensorRT engines run on CUDA devices, not {self.device}")
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs a CUDA device")
        self.card = _card_from_metadata(card_metadata, self.path)
        self.meta = meta
        self.max_batch = int(profile["max_batch"])
        self.min_batch = int(profile["min_batch"])
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeLoadError(
                f"TensorRT cannot load {self.path}: the file is corrupt or was built for another GPU or TensorRT "
                "version. Build it again."
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = tuple(
            n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
        )
        self.resolution = tuple(int(s) for s in self.card.resolution)
        self._graphs: dict[int, tuple] = {}

    def __repr__(self) -> str:
        return f"TensorRTModel({self.path.name}, batch {self.min_batch}..{self.max_batch}, {self.device})"

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The runner seam: ``images [B, 3, H, W]`` -> the deploy tuple ``(scores, labels, boxes, masks)``."""
        _check_images(images, self.resolution, self.path)
        run = self._run_graph if self.cuda_graph else self._run
        # row slices of a contiguous batch are contiguous, as the engine's bindings need
        return _run_chunked(images.to(self.device, torch.float32).contiguous(), self.max_batch, run, self.min_batch)

    def _bind(self, chunk: torch.Tensor) -> list[torch.Tensor]:
        """Set the input shape and every tensor address; returns freshly allocated outputs."""
        if not self.context.set_input_shape(self.input_name, tuple(chunk.shape)):
            raise ValueError(
                f"batch {chunk.shape[0]} is outside the engine's profile {self.min_batch}..{self.max_batch}"
            )
        self.context.set_tensor_address(self.input_name, chunk.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(
                shape, dtype=_torch_dtype(self._trt, self.engine.get_tensor_dtype(name)), device=self.device
            )
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        return outputs

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def _run(self, chunk: torch.Tensor) -> list[torch.Tensor]:
        outputs = self._bind(chunk)
        if not self.context.execute_async_v3(self._stream()):
            raise RuntimeError(f"TensorRT failed to run {self.path.name} (execute_async_v3 returned False)")
        return outputs

    def _run_graph(self, chunk: torch.Tensor) -> list[torch.Tensor]:
        """Replay (capturing on first use) the CUDA graph of this batch size."""
        entry = self._graphs.get(chunk.shape[0])
        if entry is None:
            static_in = torch.empty_like(chunk)
            static_out = self._bind(static_in)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                # TensorRT needs one enqueue after a shape change before a capture.
                self.context.execute_async_v3(stream.cuda_stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    self.context.execute_async_v3(stream.cuda_stream)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            entry = self._graphs[chunk.shape[0]] = (static_in, static_out, graph)
        static_in, static_out, graph = entry
        static_in.copy_(chunk)
        graph.replay()
        return [o.clone() for o in static_out]
