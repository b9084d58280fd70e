"""Session options of the ONNX Runtime runner."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

from rfdetr_export.runtime import OnnxRuntimeModel


def test_cpu_session_threads_spin_only_inside_a_run(export):
    # spinning between the operators of a run saves a wake-up per node; spinning after it would hold the cores
    # the host half (mask upsampling) needs next
    done = export("seg-tiny", "--dynamic-batch")
    assert done.code == 0, done.stdout + done.stderr
    options = OnnxRuntimeModel(done.path, threads=1).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert options.intra_op_num_threads == 1
