"""A stand-in for the ``tensorrt`` module (TensorRT 10/11 Python API surface that rfdetr-export uses).

No machine here has TensorRT. This fake follows the real API's names and call order closely enough that the
builder and the runtime run end to end: the "parser" reads the ONNX file with ``onnx`` and makes one layer per
node, typed from ONNX shape inference (so a strongly typed network's precision really comes from the graph);
the "engine" is the ONNX bytes behind a header; ``execute_async_v3`` runs them with ONNX Runtime, reading and
writing the tensors at the addresses given to ``set_tensor_address`` (CPU memory in tests). Builder flags are
absent on purpose: TensorRT 11 has no ``BuilderFlag.FP16`` and the code must not use it.
"""

from __future__ import annotations

import ctypes
import enum
import json

import numpy as np
import onnx

__version__ = "11.4.0.106"
__rfdetr_fake__ = True  # lets TensorRTModel use CPU tensors (a real TensorRT needs CUDA memory)
_MAGIC = b"FAKE-TRT-ENGINE\n"
calls: list[str] = []  # the API calls made, in order (tests read it)


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    INT64 = 8


_FROM_ONNX = {
    onnx.TensorProto.FLOAT: DataType.FLOAT,
    onnx.TensorProto.FLOAT16: DataType.HALF,
    onnx.TensorProto.INT32: DataType.INT32,
    onnx.TensorProto.INT64: DataType.INT64,
    onnx.TensorProto.BOOL: DataType.BOOL,
}
_NUMPY = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT32: np.int32,
    DataType.INT64: np.int64,
    DataType.BOOL: np.bool_,
}


class LayerType(enum.Enum):
    CONSTANT = "CONSTANT"
    SHUFFLE = "SHUFFLE"
    CAST = "CAST"
    SHAPE = "SHAPE"
    GATHER = "GATHER"
    SLICE = "SLICE"
    CONCATENATION = "CONCATENATION"
    MATRIX_MULTIPLY = "MATRIX_MULTIPLY"
    ELEMENTWISE = "ELEMENTWISE"
    OTHER = "OTHER"


_LAYER_OF_OP = {
    "Constant": LayerType.CONSTANT,
    "Reshape": LayerType.SHUFFLE,
    "Transpose": LayerType.SHUFFLE,
    "Unsqueeze": LayerType.SHUFFLE,
    "Squeeze": LayerType.SHUFFLE,
    "Cast": LayerType.CAST,
    "Shape": LayerType.SHAPE,
    "Gather": LayerType.GATHER,
    "Slice": LayerType.SLICE,
    "Concat": LayerType.CONCATENATION,
    "MatMul": LayerType.MATRIX_MULTIPLY,
    "Gemm": LayerType.MATRIX_MULTIPLY,
    "Add": LayerType.ELEMENTWISE,
    "Mul": LayerType.ELEMENTWISE,
}


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 5


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class Logger:
    WARNING = 2
    ERROR = 1

    def __init__(self, severity=WARNING):
        self.severity = severity


def init_libnvinfer_plugins(logger, namespace):
    calls.append("init_libnvinfer_plugins")
    return True


class _Tensor:
    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype


class _Layer:
    def __init__(self, node, types):
        self.type = _LAYER_OF_OP.get(node.op_type, LayerType.OTHER)
        self.name = node.name
        self._outputs = [_Tensor(o, _FROM_ONNX.get(types.get(o), DataType.FLOAT)) for o in node.output]
        self.num_outputs = len(self._outputs)

    def get_output(self, index):
        return self._outputs[index]


class _Network:
    def __init__(self, flags):
        self.flags = flags
        self.layers: list[_Layer] = []
        self.onnx_bytes = b""

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, index):
        return self.layers[index]


class OnnxParser:
    def __init__(self, network, logger):
        self.network = network
        self.errors: list[str] = []

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, index):
        return self.errors[index]

    def parse_from_file(self, path):
        calls.append("parse_from_file")
        try:
            model = onnx.load(path)
        except Exception as exc:  # the real parser reports, never raises
            self.errors.append(f"cannot read the model: {exc}")
            return False
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
        types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.output})
        for node in model.graph.node:
            if node.op_type == "GridSample":
                pass  # the real parser accepts it (and TensorRT may miscompile it)
            self.network.layers.append(_Layer(node, types))
        self.network.onnx_bytes = model.SerializeToString()
        return True


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, min, opt, max):
        calls.append(f"set_shape {name} {tuple(min)} {tuple(opt)} {tuple(max)}")
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class _Config:
    def __init__(self):
        self.profiles, self.pools = [], {}

    def set_memory_pool_limit(self, pool, size):
        calls.append(f"set_memory_pool_limit {pool.name} {size}")
        self.pools[pool] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags):
        calls.append(f"create_network {flags}")
        return _Network(flags)

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        calls.append("build_serialized_network")
        if not network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)):
            return None  # this fake, like TensorRT 11, builds strongly typed networks only
        if len(config.profiles) != 1:
            return None
        header = json.dumps({name: s for name, s in config.profiles[0].shapes.items()}).encode()
        return _MAGIC + len(header).to_bytes(4, "little") + header + network.onnx_bytes


class _Context:
    def __init__(self, engine):
        self.engine = engine
        self.shapes, self.addresses = {}, {}

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.profile[name]
        if not all(lo <= s <= hi for lo, s, hi in zip(low, shape, high, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        for out in self.engine.session.get_outputs():  # symbolic dims are the batch axis here
            self.shapes[out.name] = tuple(d if isinstance(d, int) else shape[0] for d in out.shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def _view(self, name, shape, dtype):
        count = int(np.prod(shape))
        buffer = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(self.addresses[name])
        return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)

    def execute_async_v3(self, stream_handle):
        calls.append("execute_async_v3")
        name = self.engine.input_name
        images = self._view(name, self.shapes[name], np.float32).copy()
        for out_name, value in zip(
            self.engine.output_names, self.engine.session.run(None, {name: images}), strict=True
        ):
            target = self._view(out_name, value.shape, _NUMPY[self.engine.get_tensor_dtype(out_name)])
            np.copyto(target, value)
        return True


class _Engine:
    def __init__(self, profile, onnx_bytes):
        import onnxruntime as ort

        self.profile = {k: [tuple(x) for x in v] for k, v in profile.items()}
        self.session = ort.InferenceSession(onnx_bytes)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._types = {o.name: o.type for o in self.session.get_outputs()}

    @property
    def num_io_tensors(self):
        return 1 + len(self.output_names)

    def get_tensor_name(self, index):
        return ([self.input_name] + self.output_names)[index]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name == self.input_name else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        kind = self._types.get(name, "tensor(float)")
        return DataType.INT64 if "int64" in kind else DataType.FLOAT

    def create_execution_context(self):
        return _Context(self)


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data):
        calls.append("deserialize_cuda_engine")
        if not data.startswith(_MAGIC):
            return None  # as TensorRT: a corrupt or foreign engine gives None (and a log line)
        size = int.from_bytes(data[len(_MAGIC) : len(_MAGIC) + 4], "little")
        start = len(_MAGIC) + 4
        profile = json.loads(data[start : start + size])
        return _Engine(profile, data[start + size :])
