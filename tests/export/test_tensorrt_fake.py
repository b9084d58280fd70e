"""The TensorRT builder and runtime against a fake ``tensorrt`` module (no TensorRT on these machines)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
import fake_tensorrt  # noqa: E402  (tests/export is on sys.path)
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from rfdetr_core.class_map import ClassMap  # noqa: E402
from rfdetr_core.errors import MissingDependencyError  # noqa: E402
from rfdetr_core.model_card import ModelCard  # noqa: E402
from rfdetr_core.preprocess import PreprocessConfig  # noqa: E402
from rfdetr_export.runtime import RuntimeLoadError, TensorRTModel  # noqa: E402
from rfdetr_export.tensorrt_build import BatchProfile, TensorRTBuildError, build_engine, sidecar_path  # noqa: E402

CARD = ModelCard(
    variant="seg-tiny",
    num_queries=2,
    num_slots=2,
    resolution=(8, 8),
    preprocess=PreprocessConfig(),
    class_map=ClassMap.from_names(["a", "b"]),
    is_segmentation=True,
)


def _tiny_deploy_graph(path, half: bool):
    """images [B,3,8,8] -> scores [B,2], labels [B,2] int64, boxes [B,2,4], masks [B,2,2,2] (toy arithmetic);
    with ``half`` the compute is fp16 between float32 casts at the borders."""
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    outs = [
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch", 2]),
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 2, 4]),
        helper.make_tensor_value_info("masks", TensorProto.FLOAT, ["batch", 2, 2, 2]),
    ]
    ints = lambda name, values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    inits = [
        ints("zero", [0]),
        ints("two", [2]),
        ints("eight", [8]),
        ints("sixteen", [16]),
        ints("one", [1]),
        ints("flat_shape", [0, -1]),
        ints("box_shape", [0, 2, 4]),
        ints("mask_shape", [0, 2, 2, 2]),
    ]
    work = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=work),
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("Slice", ["flat", "zero", "two", "one"], ["s_logits"]),
        helper.make_node("Sigmoid", ["s_logits"], ["s_work"]),
        helper.make_node("Cast", ["s_work"], ["scores"], to=TensorProto.FLOAT),
        helper.make_node("Greater", ["s_logits", "s_logits_neg"], ["positive"]),
        helper.make_node("Neg", ["s_logits"], ["s_logits_neg"]),
        helper.make_node("Cast", ["positive"], ["labels"], to=TensorProto.INT64),
        helper.make_node("Slice", ["flat", "zero", "eight", "one"], ["b_flat"]),
        helper.make_node("Sigmoid", ["b_flat"], ["b_sig"]),
        helper.make_node("Reshape", ["b_sig", "box_shape"], ["b_work"]),
        helper.make_node("Cast", ["b_work"], ["boxes"], to=TensorProto.FLOAT),
        helper.make_node("Slice", ["flat", "eight", "sixteen", "one"], ["m_flat"]),
        helper.make_node("Mul", ["m_flat", "m_flat"], ["m_sq"]),
        helper.make_node("Reshape", ["m_sq", "mask_shape"], ["m_work"]),
        helper.make_node("Cast", ["m_work"], ["masks"], to=TensorProto.FLOAT),
    ]
    # topological order: Neg before Greater
    nodes[5], nodes[6] = nodes[6], nodes[5]
    model = helper.make_model(
        helper.make_graph(nodes, "toy", [images], outs, initializer=inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def fake_trt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    fake_tensorrt.calls.clear()
    return fake_tensorrt


PROFILE = BatchProfile(1, 2, 4)


def _build(tmp_path, half=False, profile=PROFILE, **kwargs):
    onnx_path = _tiny_deploy_graph(tmp_path / "toy.onnx", half)
    engine = tmp_path / "toy.engine"
    side = build_engine(
        onnx_path,
        engine,
        input_name="images",
        resolution=(8, 8),
        profile=profile,
        half=half,
        card_metadata=CARD.to_metadata(),
        **kwargs,
    )
    return onnx_path, engine, side


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_build_and_run_equal_onnxruntime(fake_trt, tmp_path, half):
    onnx_path, engine, side = _build(tmp_path, half=half, workspace_gb=1.5)
    assert fake_trt.calls[:2] == ["create_network 32", "parse_from_file"]  # strongly typed: 1 << 5
    assert "set_shape images (1, 3, 8, 8) (2, 3, 8, 8) (4, 3, 8, 8)" in fake_trt.calls
    assert f"set_memory_pool_limit WORKSPACE {int(1.5 * 2**30)}" in fake_trt.calls
    assert side["precision"] == ("float16" if half else "float32")
    assert (side["fp16_layer_share"] >= 0.8) if half else side["fp16_layer_share"] == 0.0
    saved = json.loads(sidecar_path(engine).read_text())
    assert ModelCard.from_metadata(saved["card"]) == CARD and saved["tensorrt"] == fake_trt.__version__
    runner = TensorRTModel(engine, device="cpu")
    assert runner.card == CARD and runner.backend == "tensorrt"
    session = ort.InferenceSession(str(onnx_path))
    for batch in (1, 3, 6):  # 6 > max_batch 4: two chunks
        images = torch.randn(batch, 3, 8, 8)
        got = runner(images)
        want = session.run(None, {"images": images.numpy()})
        assert [tuple(g.shape) for g in got] == [w.shape for w in want]
        assert got[1].dtype == torch.int64
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.numpy(), w)
    assert fake_trt.calls.count("execute_async_v3") == 4


def test_fp16_engine_refused_when_graph_is_float32(fake_trt, tmp_path):
    with pytest.raises(TensorRTBuildError, match="0% of the network's compute layers are fp16.*--half"):
        build_engine(
            _tiny_deploy_graph(tmp_path / "fp32.onnx", half=False),
            tmp_path / "x.engine",
            input_name="images",
            resolution=(8, 8),
            profile=BatchProfile(1, 1, 1),
            half=True,
            card_metadata=CARD.to_metadata(),
        )
    assert not (tmp_path / "x.engine").exists()
    with pytest.raises(TensorRTBuildError, match="fp16 but --half was not given"):
        build_engine(
            _tiny_deploy_graph(tmp_path / "fp16.onnx", half=True),
            tmp_path / "y.engine",
            input_name="images",
            resolution=(8, 8),
            profile=BatchProfile(1, 1, 1),
            half=False,
            card_metadata=CARD.to_metadata(),
        )


def test_profile_arguments_are_checked():
    with pytest.raises(TensorRTBuildError, match="1 <= --min-batch <= --opt-batch <= --max-batch"):
        BatchProfile(2, 1, 4)
    with pytest.raises(TensorRTBuildError):
        BatchProfile(0, 1, 1)


def test_engine_of_another_tensorrt_or_gpu_or_corrupt_is_refused(fake_trt, tmp_path):
    _, engine, side = _build(tmp_path)
    card_file = sidecar_path(engine)
    card_file.write_text(json.dumps({**side, "tensorrt": "10.3.0"}))
    with pytest.raises(RuntimeLoadError, match="built with TensorRT 10.3.0, this is TensorRT 11.4.0.106"):
        TensorRTModel(engine, device="cpu")
    card_file.write_text(json.dumps({**side, "gpu": "NVIDIA A100", "compute_capability": "8.0"}))
    with pytest.raises(
        RuntimeLoadError, match="built for NVIDIA A100 \\(compute capability 8.0\\).*build it again"
    ):
        TensorRTModel(engine, device="cpu")
    card_file.write_text(json.dumps(side))
    engine.write_bytes(b"not an engine")
    with pytest.raises(RuntimeLoadError, match="corrupt or was built for another GPU or TensorRT"):
        TensorRTModel(engine, device="cpu")
    card_file.unlink()
    with pytest.raises(RuntimeLoadError, match="toy.json is missing"):
        TensorRTModel(engine, device="cpu")


def test_missing_tensorrt_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match="rfdetr-export\\[trt\\]"):
        TensorRTModel(tmp_path / "x.engine")
