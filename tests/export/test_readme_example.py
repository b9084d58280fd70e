"""The README's plain onnxruntime + numpy example is run as written (extracted from README.md), in a process
where rfdetr and torch cannot be imported, on an exported seg-tiny: it feeds the pixels `rfdetr_core.preprocess`
makes (to rounding: PIL's antialiased bilinear resize against ours) and unpacks the graph's outputs in order."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import torch
from PIL import Image

from rfdetr_core.preprocess import preprocess
from rfdetr_export.check import synthetic_images
from rfdetr_export.runtime import OnnxRuntimeModel

README = Path(__file__).parents[2] / "README.md"
MARKER = "With plain onnxruntime + numpy"

RUNNER = """
import sys
import numpy as np
for name in ("rfdetr_core", "rfdetr_export", "rfdetr_train", "rfdetr_serve", "torch"):
    sys.modules[name] = None  # importing any of them fails from here on: the example needs none of them
namespace = {}
exec(compile(open("example.py").read(), "README example", "exec"), namespace)
np.savez("out.npz", **{k: namespace[k] for k in ("x", "scores", "labels", "boxes", "masks", "keep")})
"""


def readme_example() -> str:
    text = README.read_text()
    after = text[text.index(MARKER) :]
    start = after.index("```python\n") + len("```python\n")
    return after[start : after.index("```", start)]


def test_the_readme_example_has_at_most_ten_lines():
    lines = [line for line in readme_example().splitlines() if line.strip()]
    assert 0 < len(lines) <= 10 and "onnxruntime" in lines[0]


def test_the_readme_example_runs_without_rfdetr_on_the_pixels_predict_sees(export, tmp_path):
    done = export("seg-tiny", "--dynamic-batch")
    assert done.code == 0, done.stderr
    shutil.copy(done.path, tmp_path / "best.onnx")
    Image.fromarray(synthetic_images(1, size=(300, 410), seed=5)[0]).save(tmp_path / "photo.jpg", quality=95)
    (tmp_path / "example.py").write_text(readme_example())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = np.load(tmp_path / "out.npz")
    runner = OnnxRuntimeModel(tmp_path / "best.onnx")
    assert out["scores"].shape == (1, 30) and out["boxes"].shape == (1, 30, 4)
    assert out["masks"].shape == (1, 30, 40, 40) and out["labels"].dtype == np.int64
    assert "[" in proc.stdout  # it printed the kept labels and boxes
    # the pixels it feeds are the ones predict feeds (PIL's antialiased bilinear resize vs ours: rounding)
    x, _ = preprocess([str(tmp_path / "photo.jpg")], (160, 160), runner.card.preprocess)
    diff = np.abs(out["x"].transpose(2, 0, 1) - x[0].numpy())
    print(f"README example vs preprocess: mean |dx| {diff.mean():.4f}, max {diff.max():.4f}")
    assert diff.mean() < 0.01 and diff.max() < 0.1  # measured: 0.0021, 0.0165
    # and its outputs are the graph's, unpacked in the right order (the runner runs the graph with ONNX
    # Runtime's fused GELU and attention, plain onnxruntime the file's nodes: float order, ~1e-6)
    want = runner(torch.from_numpy(out["x"].transpose(2, 0, 1)[None].astype(np.float32)))
    for name, w in zip(("scores", "labels", "boxes", "masks"), want, strict=True):
        np.testing.assert_allclose(out[name], w.numpy(), atol=1e-4, rtol=0, err_msg=name)
    np.testing.assert_array_equal(out["keep"], out["scores"][0] > 0.5)
