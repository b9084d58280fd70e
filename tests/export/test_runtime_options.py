"""Session options of the ONNX Runtime runner."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

from rfdetr_export.runtime import OnnxRuntimeModel, _fused_for_onnxruntime


def test_cpu_session_threads_spin_only_inside_a_run(export):
    # spinning between the operators of a run saves a wake-up per node; spinning after it would hold the cores
    # the host half (mask upsampling) needs next
    done = export("seg-tiny", "--dynamic-batch")
    assert done.code == 0, done.stdout + done.stderr
    options = OnnxRuntimeModel(done.path, threads=1).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert options.intra_op_num_threads == 1


def test_float32_files_run_with_onnx_runtimes_fused_gelu_and_attention(export):
    # the file stays standard ONNX (TensorRT reads it); the runner hands ONNX Runtime a fused copy
    import onnx

    from rfdetr_core.variants import get_variant

    done = export("seg-tiny", "--dynamic-batch")
    on_disk = [n.op_type for n in onnx.load(str(done.path)).graph.node]
    assert "Erf" in on_disk and "MultiHeadAttention" not in on_disk
    loaded = _fused_for_onnxruntime(done.path)
    assert isinstance(loaded, bytes)
    fused = [n.op_type for n in onnx.ModelProto.FromString(loaded).graph.node]
    assert "Erf" not in fused and fused.count("Gelu") > 0
    assert fused.count("MultiHeadAttention") == get_variant("seg-tiny").encoder_depth
    assert [n.op_type for n in onnx.load(str(done.path)).graph.node] == on_disk  # the file is unchanged


def test_a_file_that_is_not_onnx_reaches_onnx_runtime_unchanged(tmp_path):

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    assert _fused_for_onnxruntime(bad) == str(bad)
