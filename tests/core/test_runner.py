"""The runner seam: RFDETR over any runner, from_file by suffix, a clear error without a runner."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from rfdetr_core import runner as runner_mod
from rfdetr_core.errors import MissingDependencyError
from rfdetr_core.predict import RFDETR
from rfdetr_core.runner import Runner, TorchRunner


class _Wrapped:
    """A runner that is not the torch one (stands in for ONNX Runtime): same protocol, other backend."""

    backend = "fake"

    def __init__(self, inner: TorchRunner):
        self.inner, self.card, self.device = inner, inner.card, inner.device
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return tuple(t.clone() for t in self.inner(images))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RFDETR("seg-tiny", num_classes=3, device="cpu")


def test_predict_over_another_runner_equals_torch(model):
    assert isinstance(model.runner, Runner) and model.runner.backend == "pytorch"
    image = (np.random.default_rng(0).random((45, 61, 3)) * 255).astype(np.uint8)
    ref = model.predict(image, threshold=0.0, mask_format="bool")
    fake = _Wrapped(model.runner)
    other = RFDETR.from_runner(fake)
    got = other.predict(image, threshold=0.0, mask_format="bool")
    assert fake.calls == 1 and other.model is None and other.class_names == model.class_names
    np.testing.assert_array_equal(got.scores, ref.scores)
    np.testing.assert_array_equal(got.boxes, ref.boxes)
    np.testing.assert_array_equal(got.category_ids, ref.category_ids)
    np.testing.assert_array_equal(got.slots, ref.slots)
    np.testing.assert_array_equal(got.masks, ref.masks)
    assert got.to_coco(1) == ref.to_coco(1)
    # fewer pairs than the runner keeps: the first num_select of its sorted K
    few = other.predict(image, threshold=0.0, num_select=5, mask_format="bool")
    np.testing.assert_array_equal(few.scores, ref.scores[: len(few)])
    with pytest.raises(ValueError, match="larger num_select"):
        other.predict(image, num_select=10_000)


def test_torch_runner_checks_its_input(model):
    with pytest.raises(ValueError, match="runs at"):
        model.runner(torch.zeros(1, 3, 64, 96))


def test_from_file_without_a_runner_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [])
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(MissingDependencyError, match=r"pip install rfdetr-export\[onnx\]"):
        RFDETR.from_file(tmp_path / "m.onnx")
    assert runner_mod.ENTRY_POINT_GROUP == "rfdetr_core.runners"


def test_from_file_uses_the_registered_runner(tmp_path, monkeypatch, model):
    made = []

    class _EP:
        name = "onnx"

        def load(self):
            def factory(path, device=None, **options):
                made.append((path.name, device, options))
                return _Wrapped(model.runner)

            return factory

    monkeypatch.setattr(
        "importlib.metadata.entry_points", lambda group: [_EP()] if group == "rfdetr_core.runners" else []
    )
    (tmp_path / "m.onnx").write_bytes(b"")
    got = RFDETR.from_file(tmp_path / "m.onnx", device="cpu")
    assert made == [("m.onnx", "cpu", {})] and got.runner.backend == "fake"
