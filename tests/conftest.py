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
    """Never touch the user's ~/.cache/rfdetr: each test session gets its own RFDETR_HOME."""
    if "RFDETR_HOME" not in os.environ or os.environ.get("RFDETR_TEST_HOME_SET") == "1":
        home = tmp_path_factory.getbasetemp() / "rfdetr_home"
        monkeypatch.setenv("RFDETR_HOME", str(home))
        monkeypatch.setenv("RFDETR_TEST_HOME_SET", "1")
