"""``--deform-attn trt-plugin``: ``torch.ops.rfdetr.ms_deform_attn`` as NVIDIA's ``MultiscaleDeformableAttnPlugin_TRT``.

The plugin ships in TensorRT's ``libnvinfer_plugin`` (NVIDIA/TensorRT ``plugin/multiscaleDeformableAttnPlugin``;
v2 on IPluginV3 since April 2025): inputs ``value [N, S, M, D]``, ``spatial_shapes [L, 2]`` int32,
``level_start_index [L]`` int32, ``sampling_locations [N, Lq, M, L, P, 2]`` and ``attention_weights
[N, Lq, M, L, P]``; output ``[N, Lq, M, D]``, which is reshaped to our ``[N, Lq, M*D]``. The TensorRT ONNX
parser looks an unknown op type up in the plugin registry by name. Only TensorRT runs such a graph (ONNX
Runtime has no kernel for it), so the post-export check runs on the engine instead.
"""

from __future__ import annotations

import numpy as np

PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_OP = "MultiscaleDeformableAttnPlugin_TRT"


def register_plugin_schema() -> None:
    """Tell onnx (and so onnxscript and the checker) the plugin node's signature; idempotent."""
    from onnx import defs

    if defs.has(PLUGIN_OP, PLUGIN_DOMAIN):
        return
    float_types = ["tensor(float)", "tensor(float16)"]
    schema = defs.OpSchema(
        PLUGIN_OP,
        PLUGIN_DOMAIN,
        1,
        doc="TensorRT's multi-scale deformable attention plugin (libnvinfer_plugin).",
        inputs=[
            defs.OpSchema.FormalParameter("value", "T"),
            defs.OpSchema.FormalParameter("spatial_shapes", "I"),
            defs.OpSchema.FormalParameter("level_start_index", "I"),
            defs.OpSchema.FormalParameter("sampling_locations", "T"),
            defs.OpSchema.FormalParameter("attention_weights", "T"),
        ],
        outputs=[defs.OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", float_types, "value type"), ("I", ["tensor(int32)"], "index type")],
    )
    defs.register_schema(schema)


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: our op -> the plugin node."""
    import onnx
    import onnxscript
    import torch
    from onnxscript import opset18 as op

    register_plugin_schema()
    plugin = onnxscript.values.Opset(PLUGIN_DOMAIN, 1)

    def ms_deform_attn_plugin(value, spatial_shapes, sampling_locations, attention_weights):
        pairs = np.asarray(list(spatial_shapes), dtype=np.int32).reshape(-1, 2)  # [L, 2] (H, W)
        starts = np.concatenate([[0], np.cumsum(pairs[:, 0] * pairs[:, 1])[:-1]]).astype(np.int32)  # [L]
        shapes_const = op.Constant(value=onnx.numpy_helper.from_array(pairs))
        starts_const = op.Constant(value=onnx.numpy_helper.from_array(starts))
        out = plugin.MultiscaleDeformableAttnPlugin_TRT(
            value, shapes_const, starts_const, sampling_locations, attention_weights
        )
        # [N, Lq, M, D] -> [N, Lq, M*D]
        return op.Reshape(out, op.Constant(value_ints=[0, 0, -1]))

    return {torch.ops.rfdetr.ms_deform_attn.default: ms_deform_attn_plugin}
