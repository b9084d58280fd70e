"""Suite-wide test settings: offline hubs, GPU tests skipped without CUDA, an isolated RFDETR_HOME."""

from __future__ import annotations

import os

import pytest

# No test downloads anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_rfdetr_home(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache/rfdetr: unless RFDETR_HOME is set explicitly (e.g. to reuse a built
    CUDA extension on the GPU machine), the test session gets its own."""
    if "RFDETR_HOME" not in os.environ:
        monkeypatch.setenv("RFDETR_HOME", str(tmp_path_factory.getbasetemp() / "rfdetr_home"))
