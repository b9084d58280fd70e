"""`rfdetr-serve MODEL`: exported files (.onnx, .engine, .pt2) go through `RFDETR.from_file` (the runner their
suffix registers), weights through `from_checkpoint`; a missing exported file is a clear error."""

from __future__ import annotations

import pytest

from rfdetr_core import RFDETR
from rfdetr_core.errors import CheckpointError
from rfdetr_serve.inference import load_rfdetr


@pytest.mark.parametrize("suffix", [".onnx", ".engine", ".pt2", ".PT2"])
def test_exported_files_go_through_from_file(monkeypatch, tmp_path, suffix):
    calls = []
    monkeypatch.setattr(RFDETR, "from_file", classmethod(lambda cls, path, **kw: calls.append((path, kw)) or "ok"))
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"x")
    assert load_rfdetr(str(path), None) == "ok" and calls == [(path, {})]
    assert load_rfdetr(str(path), "cpu") == "ok" and calls[-1] == (path, {"device": "cpu"})


def test_a_missing_exported_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_rfdetr(str(tmp_path / "missing.pt2"), None)
