"""Our checkpoint format: round trip, atomic write, refusal of pickled files, metadata."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from rfdetr_core.checkpoint import FORMAT_VERSION, load_checkpoint, read_metadata, save_checkpoint
from rfdetr_core.class_map import ClassMap
from rfdetr_core.errors import CheckpointError
from rfdetr_core.preprocess import PreprocessConfig


def _state():
    torch.manual_seed(0)
    w = torch.randn(4, 3)
    return {"a.weight": w, "a.bias": torch.zeros(4), "b.t": w.t(), "tied": w, "n": torch.tensor(3)}


def test_round_trip_tensors_and_metadata(tmp_path):
    cm = ClassMap.from_names(["cat", "dog"], first_category_id=1)
    meta = {
        "variant": "seg-nano",
        "resolution": [312, 312],
        "preprocess": PreprocessConfig().to_json(),
        "class_map": cm.to_json(),
    }
    path = save_checkpoint(tmp_path / "m.safetensors", _state(), meta)
    sd, got = load_checkpoint(path)
    for k, v in _state().items():
        assert torch.equal(sd[k], v), k
    assert got["format_version"] == FORMAT_VERSION
    assert got["variant"] == "seg-nano"
    assert ClassMap.from_json(got["class_map"]) == cm
    assert PreprocessConfig.from_json(got["preprocess"]) == PreprocessConfig()
    assert read_metadata(path) == got


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"x": torch.ones(2)}, {"variant": "old"})
    import safetensors.torch

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"x": torch.zeros(2)}, {"variant": "new"})
    assert read_metadata(path)["variant"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_pickle_files_are_refused(tmp_path):
    zipped = tmp_path / "upstream.pth"
    torch.save({"model": {"x": torch.ones(1)}}, zipped)
    with pytest.raises(CheckpointError, match="zip archive.*never unpickled"):
        load_checkpoint(zipped)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="Python pickle"):
        load_checkpoint(raw)


def test_truncated_and_missing_files(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", {"x": torch.ones(1000)}, {})
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty")


def test_newer_format_and_bad_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "future.safetensors"
    save_file({"x": torch.ones(1)}, str(path), metadata={"rfdetr": json.dumps({"format_version": 99})})
    with pytest.raises(CheckpointError, match="Upgrade rfdetr-core"):
        read_metadata(path)
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "x.safetensors", {"x": torch.ones(1)}, {"bad": object()})
    with pytest.raises(CheckpointError, match="not a tensor"):
        save_checkpoint(tmp_path / "x.safetensors", {"x": 3}, {})
    # a plain safetensors file without our metadata still loads, with empty metadata
    save_file({"x": torch.ones(1)}, str(tmp_path / "plain.safetensors"))
    assert load_checkpoint(tmp_path / "plain.safetensors")[1] == {}
