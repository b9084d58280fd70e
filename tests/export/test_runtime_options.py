"""Session options of the ONNX Runtime runner."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

from rfdetr_export.runtime import OnnxRuntimeModel


def test_cpu_session_threads_do_not_spin(export):
    # spinning threads compete with the host half (mask upsampling) and with each other for the same cores
    done = export("seg-tiny", "--dynamic-batch")
    assert done.code == 0, done.stdout + done.stderr
    options = OnnxRuntimeModel(done.path, threads=1).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 1
