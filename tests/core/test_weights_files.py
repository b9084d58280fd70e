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
