"""Reading weight files of every kind, safely (files are made here with torch.save / save_checkpoint)."""

from __future__ import annotations

import argparse
import pathlib
from collections import OrderedDict

import pytest
import torch

from rfdetr_core.checkpoint import save_checkpoint
from rfdetr_core.class_map import ClassMap
from rfdetr_core.errors import CheckpointError
from rfdetr_core.preprocess import PreprocessConfig
from rfdetr_core.weights.files import guess_variant_from_shapes, read_weights_file

SIDE_EFFECTS: list[str] = []


def _record(msg):
    SIDE_EFFECTS.append(msg)
    return msg


class Payload:
    """A pickle that would run code when loaded without weights_only."""

    def __reduce__(self):
        return (_record, ("code ran",))


def _upstream_sd(slots=91):
    return OrderedDict(
        {
            "backbone.0.encoder.encoder.embeddings.cls_token": torch.zeros(1, 1, 4),
            "class_embed.weight": torch.randn(slots, 8),
            "class_embed.bias": torch.randn(slots),
        }
    )


def test_upstream_pth_with_namespace_args(tmp_path):
    names = ["cat", "dog", "fish"]
    path = tmp_path / "finetuned.pth"
    args = argparse.Namespace(class_names=names, resolution=384, num_queries=100, lr=1e-4)
    sd = _upstream_sd(4)
    torch.save({"model": sd, "args": args, "epoch": 12}, path)
    wf = read_weights_file(path)
    assert wf.format == "upstream" and wf.upstream_layout
    assert wf.num_slots == 4 and wf.resolution == (384, 384)
    assert wf.class_map.names == names and wf.class_map.num_slots == 4
    assert [wf.class_map.category_id(s) for s in range(4)] == [0, 1, 2, None]
    assert wf.preprocess == PreprocessConfig(antialias=False)
    assert wf.metadata["num_queries"] == 100
    assert torch.equal(wf.state_dict["class_embed.bias"], sd["class_embed.bias"])


def test_upstream_coco_weights_use_coco_ids(tmp_path):
    path = tmp_path / "rf-detr-seg-nano.pt"
    torch.save({"model": _upstream_sd(91), "args": {"num_classes": 90}}, path)
    cm = read_weights_file(path).class_map
    assert cm.num_slots == 91 and len(cm) == 80
    assert cm.name(1) == "person" and cm.category_id(90) == 90 and cm.category_id(12) is None


def test_bare_state_dict(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(_upstream_sd(7), path)
    wf = read_weights_file(path)
    assert wf.format == "state-dict" and wf.upstream_layout and wf.num_slots == 7
    assert wf.class_map is None


def test_lightning_ckpt(tmp_path):
    sd = _upstream_sd(3)
    state = {f"model.{k}": v for k, v in sd.items()}
    state["model._orig_mod.query_feat.weight"] = torch.zeros(2, 8)  # saved from a torch.compile'd model
    state["criterion.empty_weight"] = torch.ones(3)  # not model weights: ignored
    ckpt = {
        "state_dict": state,
        "args": {"class_names": ["a", "b"]},
        "model_name": "RFDETRSegSmall",
        "global_step": 10,
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 3}}}},
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5), "dirpath": "/x"}},
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    wf = read_weights_file(path)
    assert wf.format == "upstream-lightning"
    assert set(wf.state_dict) == set(sd) | {"query_feat.weight"}
    assert wf.variant == "seg-small" and wf.class_map.names == ["a", "b"]


def test_our_safetensors(tmp_path):
    cm = ClassMap.from_names(["x", "y"], first_category_id=5)
    meta = {
        "variant": "seg-tiny",
        "resolution": [192, 224],
        "class_map": cm.to_json(),
        "preprocess": PreprocessConfig(antialias=False).to_json(),
    }
    path = save_checkpoint(tmp_path / "m.safetensors", {"class_embed.bias": torch.arange(2.0)}, meta)
    wf = read_weights_file(path)
    assert wf.format == "rfdetr" and not wf.upstream_layout
    assert wf.variant == "seg-tiny" and wf.resolution == (192, 224)
    assert wf.class_map == cm and wf.preprocess.antialias is False


@pytest.mark.parametrize(
    ("payload", "wanted"),
    [(Payload(), "_record"), (pathlib.PurePosixPath("runs/x"), "pathlib.PurePosixPath")],
)
def test_disallowed_pickle_is_refused_without_running_code(tmp_path, payload, wanted):
    path = tmp_path / "evil.pth"
    torch.save({"model": _upstream_sd(), "args": payload}, path)
    SIDE_EFFECTS.clear()
    with pytest.raises(CheckpointError, match="refused") as info:
        read_weights_file(path)
    assert wanted in str(info.value)
    assert SIDE_EFFECTS == []


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": _upstream_sd()}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated|Cannot read"):
        read_weights_file(path)
    with pytest.raises(CheckpointError, match="not found"):
        read_weights_file(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="folder"):
        read_weights_file(tmp_path)


def test_dict_without_weights_is_explained(tmp_path):
    path = tmp_path / "opt.pth"
    torch.save({"optimizer": {"lr": 1.0}, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="no weights found"):
        read_weights_file(path)


def _shapes_sd(patch=12, grid=26, layers=4, seg=True, hidden=256, enc=384):
    e = "backbone.0.encoder.encoder.embeddings."
    sd = {
        e + "patch_embeddings.projection.weight": torch.empty(enc, 3, patch, patch),
        e + "position_embeddings": torch.empty(1, grid * grid + 1, enc),
        "query_feat.weight": torch.empty(13, hidden),
    }
    for i in range(layers):
        sd[f"transformer.decoder.layers.{i}.norm1.weight"] = torch.empty(hidden)
    if seg:
        sd["segmentation_head.bias"] = torch.empty(1)
    return sd


def test_variant_from_shapes():
    assert guess_variant_from_shapes(_shapes_sd()) == "seg-nano"
    assert guess_variant_from_shapes(_shapes_sd(grid=36, layers=5)) == "seg-medium"
    assert guess_variant_from_shapes(_shapes_sd(patch=16, grid=24, layers=2, seg=False)) == "nano"
    assert guess_variant_from_shapes(_shapes_sd(grid=30)) is None  # fits nothing registered


def _broken_files(tmp_path) -> dict[str, pathlib.Path]:
    """Files that are no (complete) checkpoint, named as weights files are."""
    ours = save_checkpoint(tmp_path / "ok.safetensors", {"x": torch.ones(4000)}, {"variant": "seg-tiny"})
    zipped, legacy = tmp_path / "ok.pth", tmp_path / "legacy.pth"
    torch.save({"model": _upstream_sd()}, zipped)
    torch.save({"model": _upstream_sd()}, legacy, _use_new_zipfile_serialization=False)
    text = b"<html><body>404 Not Found</body></html>\n"  # what a failed download often saves
    blobs = {
        "text.pth": text,
        "text.safetensors": text,
        "empty.pth": b"",
        "random.pth": bytes(range(256)) * 8,
        "half.safetensors": ours.read_bytes()[: ours.stat().st_size // 2],
        "header-cut.safetensors": ours.read_bytes()[:40],
        "header-damaged.safetensors": ours.read_bytes()[:20] + b"\xff\xfe" + ours.read_bytes()[22:],
        "half-zip.pth": zipped.read_bytes()[: zipped.stat().st_size // 2],
        "half-legacy.pth": legacy.read_bytes()[: legacy.stat().st_size // 2],
        "cut-legacy.pth": legacy.read_bytes()[:30],
        "zip-as.safetensors": zipped.read_bytes()[: zipped.stat().st_size // 2],
    }
    out = {}
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    return out


def test_files_that_are_no_checkpoint_raise_checkpoint_error(tmp_path):
    # issue 12.5: text renamed .pth ended in KeyError from torch's unpickler, as .safetensors in a
    # SafetensorError; truncated downloads in either. Each must say what it is not, that it may be
    # truncated or corrupt, and what to do, through every entry point.
    from rfdetr_core.factory import load_model
    from rfdetr_core.predict import RFDETR

    entry_points = {
        "read_weights_file": read_weights_file,
        "load_model": lambda p: load_model(weights=p),
        "RFDETR.from_checkpoint": lambda p: RFDETR.from_checkpoint(p, device="cpu"),
    }
    for name, path in _broken_files(tmp_path).items():
        for entry, load in entry_points.items():
            with pytest.raises(CheckpointError) as info:
                load(path)
            msg = str(info.value)
            assert str(path) in msg, (name, entry, msg)
            assert "not a weights file" in msg or "is not a" in msg or "damaged" in msg, (name, entry, msg)
            assert "truncated or corrupt" in msg and "download or export it again" in msg, (name, entry, msg)
            assert "\n" not in msg and len(msg) < 400, (name, entry, msg)


def test_what_the_file_is_is_named(tmp_path):
    files = _broken_files(tmp_path)
    cases = {
        "text.safetensors": "is a text file (it starts with '<html><b')",
        "empty.pth": "is not a weights file: it is empty",
        "half.safetensors": "is not a complete safetensors checkpoint",
        "header-cut.safetensors": "is not a complete safetensors checkpoint: its header should be",
        "header-damaged.safetensors": "is a damaged safetensors file",
        "half-zip.pth": "is not a readable PyTorch checkpoint (RuntimeError",
        "zip-as.safetensors": "is not a readable PyTorch checkpoint",
        "random.pth": "is a file of an unknown kind",
    }
    for name, expected in cases.items():
        with pytest.raises(CheckpointError) as info:
            read_weights_file(files[name])
        assert expected in str(info.value), (name, str(info.value))


def test_a_run_folder_or_the_training_state_points_to_the_weights_file(tmp_path):
    """`val --weights runs/train` and `.../checkpoints/last/model.safetensors` name the file to pass."""
    from rfdetr_core import RFDETR

    run = tmp_path / "train"
    (run / "checkpoints" / "last").mkdir(parents=True)
    (run / "best.safetensors").write_bytes(b"x")
    (run / "last.safetensors").write_bytes(b"x")
    (run / "checkpoints" / "last" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="training run folder; pass its weights file") as info:
        RFDETR.from_checkpoint(run)
    assert str(run / "best.safetensors") in str(info.value)
    with pytest.raises(CheckpointError, match="resumable training state") as info:
        RFDETR.from_checkpoint(run / "checkpoints" / "last" / "model.safetensors")
    assert str(run / "last.safetensors") in str(info.value) and "--resume" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no weights file in it"):
        RFDETR.from_checkpoint(empty)
    # from_file (what `val --weights`, serve and export use) says the same before it looks for a runner by suffix
    with pytest.raises(CheckpointError, match="training run folder; pass its weights file") as info:
        RFDETR.from_file(run)
    assert str(run / "best.safetensors") in str(info.value)
    (empty / "model.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"pass one of the weights files in it: model\.onnx"):
        RFDETR.from_file(empty)
    with pytest.raises(CheckpointError, match="Model file not found: .*missing.onnx"):
        RFDETR.from_file(tmp_path / "missing.onnx")
