"""What an ONNX graph meant for TensorRT must (not) contain, checked before any engine is built.

:data:`TRT_PARSER_OPS` is the "Supported: Y" column of the TensorRT ONNX parser's operator matrix,
onnx/onnx-tensorrt ``docs/operators.md`` at the ONNX-TensorRT 10.1 GA release (commit 96e7811, 2024-06-17;
"TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20"). On top of it:

* no ``GridSample``, although the parser accepts it: TensorRT 10.13-11.1 compile GridSample-based deformable
  attention wrongly without an error (NVIDIA/TensorRT#4813, #4646), so ``--trt`` exports use the gather
  sampler (or the plugin);
* no shape tensor built by ``ScatterND`` (a ScatterND whose output reaches a ``Reshape``/``Expand``/``Tile``/
  ``Slice``/``ConstantOfShape``/``Range`` shape input): TensorRT must evaluate shape tensors at build time and
  such graphs fail or are wrong at batch > 1;
* ``TopK``: ``sorted=1`` and a constant ``K`` below 3840 (the matrix' restrictions; a computed ``K`` is
  allowed since TensorRT 10, the 8.4 matrix still required an initializer).
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

# onnx/onnx-tensorrt docs/operators.md @ 96e7811 (ONNX-TensorRT 10.1 GA), rows marked "Y".
TRT_PARSER_OPS = frozenset(
    [
        "Abs",
        "Acos",
        "Acosh",
        "Add",
        "And",
        "ArgMax",
        "ArgMin",
        "Asin",
        "Asinh",
        "Atan",
        "Atanh",
        "AveragePool",
        "BatchNormalization",
        "Cast",
        "CastLike",
        "Ceil",
        "Celu",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "ConvTranspose",
        "Cos",
        "Cosh",
        "CumSum",
        "DeformConv",
        "DepthToSpace",
        "DequantizeLinear",
        "Div",
        "Dropout",
        "Einsum",
        "Elu",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "EyeLike",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "GatherND",
        "Gelu",
        "Gemm",
        "GlobalAveragePool",
        "GlobalLpPool",
        "GlobalMaxPool",
        "Greater",
        "GreaterOrEqual",
        "GridSample",
        "GroupNormalization",
        "GRU",
        "HardSigmoid",
        "HardSwish",
        "Hardmax",
        "Identity",
        "If",
        "ImageScaler",
        "InstanceNormalization",
        "IsInf",
        "IsNaN",
        "LayerNormalization",
        "LeakyRelu",
        "Less",
        "LessOrEqual",
        "Log",
        "LogSoftmax",
        "Loop",
        "LRN",
        "LSTM",
        "LpNormalization",
        "LpPool",
        "MatMul",
        "Max",
        "MaxPool",
        "Mean",
        "MeanVarianceNormalization",
        "Min",
        "Mish",
        "Mod",
        "Mul",
        "Neg",
        "NonMaxSuppression",
        "NonZero",
        "Not",
        "OneHot",
        "Or",
        "Pad",
        "ParametricSoftplus",
        "Pow",
        "PRelu",
        "QuantizeLinear",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Range",
        "Reciprocal",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "ReduceSumSquare",
        "Relu",
        "Reshape",
        "Resize",
        "ReverseSequence",
        "RNN",
        "RoiAlign",
        "Round",
        "ScaledTanh",
        "Scan",
        "Scatter",
        "ScatterElements",
        "ScatterND",
        "Selu",
        "Shape",
        "Shrink",
        "Sigmoid",
        "Sign",
        "Sin",
        "Sinh",
        "Size",
        "Slice",
        "Softmax",
        "Softplus",
        "Softsign",
        "SpaceToDepth",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tan",
        "Tanh",
        "ThresholdedRelu",
        "Tile",
        "TopK",
        "Transpose",
        "Trilu",
        "Unsqueeze",
        "Upsample",
        "Where",
        "Xor",
    ]
)
TRT_PLUGIN_OPS = frozenset({"MultiscaleDeformableAttnPlugin_TRT"})  # from libnvinfer_plugin
FORBIDDEN_OPS = frozenset({"GridSample"})
TOPK_MAX = 3840
# (op type, input index) of inputs that TensorRT treats as shape tensors.
_SHAPE_INPUTS = {
    ("Reshape", 1),
    ("Expand", 1),
    ("Tile", 1),
    ("ConstantOfShape", 0),
    ("Range", 0),
    ("Range", 1),
    ("Slice", 1),
    ("Slice", 2),
    ("Slice", 3),
    ("Slice", 4),
    ("Resize", 3),
}


def trt_graph_problems(model: onnx.ModelProto, allow_plugins: bool = False) -> list[str]:
    """One line per reason the graph is unfit for TensorRT (empty list: fit)."""
    problems = []
    allowed = TRT_PARSER_OPS | (TRT_PLUGIN_OPS if allow_plugins else frozenset())
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in FORBIDDEN_OPS:
            problems.append(
                f"{node.name}: {node.op_type} (TensorRT miscompiles it; export with --deform-attn gather)"
            )
        elif node.op_type not in allowed:
            problems.append(f"{node.name}: {node.op_type} is not supported by the TensorRT ONNX parser")
        if node.op_type == "TopK":
            problems.extend(_topk_problems(node, inits, producers))
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if (node.op_type, index) in _SHAPE_INPUTS and _built_by_scatter(name, producers):
                problems.append(f"{node.name}: its shape input {name!r} is built with ScatterND")
    return problems


def _topk_problems(node: onnx.NodeProto, inits, producers) -> list[str]:
    """The matrix' TopK rules: ``sorted`` must be 1, a constant ``K`` must be below :data:`TOPK_MAX`."""
    problems = []
    for attr in node.attribute:
        if attr.name == "sorted" and attr.i != 1:
            problems.append(f"{node.name}: TopK with sorted=0 (TensorRT needs sorted=1)")
    k = inits.get(node.input[1]) if len(node.input) > 1 else None
    if k is None and len(node.input) > 1 and node.input[1] in producers:
        producer = producers[node.input[1]]
        k = producer.attribute[0].t if producer.op_type == "Constant" and producer.attribute else None
    if k is not None and int(numpy_helper.to_array(k).reshape(-1)[0]) >= TOPK_MAX:
        problems.append(f"{node.name}: TopK K={int(numpy_helper.to_array(k).reshape(-1)[0])} >= {TOPK_MAX}")
    return problems


def _built_by_scatter(name: str, producers: dict[str, onnx.NodeProto], depth: int = 0) -> bool:
    """Whether ``name`` is (through shape-preserving plumbing) the output of a ScatterND."""
    node = producers.get(name)
    if node is None or depth > 16:
        return False
    if node.op_type in ("ScatterND", "ScatterElements"):
        return True
    if node.op_type in ("Cast", "Identity", "Concat", "Squeeze", "Unsqueeze", "Reshape", "Slice", "Gather"):
        inputs = node.input if node.op_type == "Concat" else node.input[:1]
        return any(_built_by_scatter(i, producers, depth + 1) for i in inputs)
    return False
