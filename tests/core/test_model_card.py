"""ModelCard round trips, the checkpoint writer, strip, and files written by rfdetr 0.1.0 still loading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rfdetr_core.checkpoint import (
    expand_groups,
    load_checkpoint,
    read_metadata,
    save_model,
    strip_checkpoint,
    strip_state_dict,
)
from rfdetr_core.class_map import ClassEntry, ClassMap
from rfdetr_core.errors import CheckpointError
from rfdetr_core.factory import load_model
from rfdetr_core.model_card import ModelCard
from rfdetr_core.preprocess import PreprocessConfig

FIXTURE = Path(__file__).parent / "fixtures" / "seg-tiny-v0.1.0.safetensors"


def _fixture_value(index: int) -> float:  # the rule of fixtures/make_v010_checkpoint.py
    return 0.001 * (index % 17) - 0.008


def _card(**changes) -> ModelCard:
    cm = ClassMap([ClassEntry(0, 3, "a"), ClassEntry(2, 7, "b")], 4)
    base = dict(
        variant="seg-tiny",
        num_queries=30,
        num_slots=4,
        resolution=(96, 128),
        preprocess=PreprocessConfig(antialias=False),
        class_map=cm,
        is_segmentation=True,
    )
    return ModelCard(**{**base, **changes})


def test_card_round_trip_is_json_safe():
    card = _card(num_select=50)
    meta = json.loads(json.dumps(card.to_metadata()))
    assert ModelCard.from_metadata(meta) == card
    assert meta["mask_size"] == [24, 32] and card.mask_size == (24, 32)
    assert card.default_num_select == 50 and _card().default_num_select == 30
    assert _card(is_segmentation=False).mask_size is None


def test_card_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="class map has 4 slots"):
        _card(num_slots=5)
    with pytest.raises(ValueError, match="resolution"):
        _card(resolution=(0, 10))
    with pytest.raises(CheckpointError, match="missing class_map"):
        ModelCard.from_metadata({"variant": "seg-tiny", "num_queries": 30, "resolution": [96, 96]})
    with pytest.raises(CheckpointError, match="newer"):
        ModelCard.from_metadata({**_card().to_metadata(), "card_version": 99})


def test_file_written_by_v010_loads():
    meta = read_metadata(FIXTURE)
    assert "card_version" not in meta and "num_slots" not in meta  # really the 0.1.0 layout
    loaded = load_model(weights=FIXTURE)
    card = loaded.card
    assert card.variant == "seg-tiny" and card.num_queries == 30 and card.num_slots == 3
    assert card.resolution == (96, 128) and card.preprocess == PreprocessConfig()
    assert card.class_map.category_ids == [1, 5, 9] and card.class_map.names == ["cat", "dog", "bird"]
    assert card.is_segmentation and card.mask_size == (24, 32) and card.num_select is None
    sd = loaded.model.state_dict()
    for i, key in enumerate(sorted(sd)):
        if sd[key].is_floating_point():
            assert torch.all(sd[key] == torch.tensor(_fixture_value(i), dtype=sd[key].dtype)), key
    # the facade reads the same card
    from rfdetr_core.predict import RFDETR

    model = RFDETR.from_checkpoint(FIXTURE, device="cpu")
    assert model.resolution == (96, 128) and model.class_names == ["cat", "dog", "bird"]


def test_weights_file_reads_its_fields_from_the_card(tmp_path):
    from rfdetr_core.weights.files import WeightsFile, read_weights_file

    card = _card()
    wf = WeightsFile(path=tmp_path / "m", format="rfdetr", state_dict={}, upstream_layout=False, card=card)
    assert (wf.variant, wf.resolution, wf.class_map, wf.preprocess, wf.num_slots) == (
        card.variant,
        card.resolution,
        card.class_map,
        card.preprocess,
        card.num_slots,
    )
    with pytest.raises(ValueError, match="contradicts its card"):
        WeightsFile(
            path=tmp_path / "m", format="rfdetr", state_dict={}, upstream_layout=False, card=card, num_slots=5
        )
    read = read_weights_file(FIXTURE)  # our file: every field comes from its card
    assert read.card is not None and read.resolution == read.card.resolution
    assert read.class_map == read.card.class_map and read.variant == read.card.variant


def test_save_model_writes_the_card_and_record(tmp_path):
    loaded = load_model(weights=FIXTURE)
    path = save_model(tmp_path / "m.safetensors", loaded.model.state_dict(), loaded.card, record={"step": 7})
    meta = read_metadata(path)
    assert meta["step"] == 7 and meta["format_version"] == 1
    assert ModelCard.from_metadata(meta) == loaded.card
    assert load_model(weights=path).card == loaded.card
    with pytest.raises(CheckpointError, match="overwrite the model card"):
        save_model(
            tmp_path / "x.safetensors", loaded.model.state_dict(), loaded.card, record={"variant": "x"}
        )


def test_strip_keeps_group_zero_and_the_outputs(tmp_path):
    loaded = load_model(weights=FIXTURE)
    model = loaded.model
    g, q = model.group_detr, model.num_queries
    # distinct values per group, so that a wrong row or head would show
    with torch.no_grad():
        model.query_feat.weight.copy_(torch.randn_like(model.query_feat.weight))
        model.refpoint_embed.weight.copy_(torch.randn_like(model.refpoint_embed.weight) * 0.1)
        for p in model.query_selection.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    full = save_model(tmp_path / "full.safetensors", model.state_dict(), loaded.card, record={"step": 3})
    before, after = strip_checkpoint(full, tmp_path / "slim.safetensors")
    assert after < before
    sd, meta = load_checkpoint(tmp_path / "slim.safetensors")
    assert meta["detr_groups"] == 1 and meta["format_version"] == 2 and meta["step"] == 3
    assert sd["query_feat.weight"].shape[0] == q
    assert {
        re.match(r"query_selection\.\w+\.(\d+)\.", k).group(1) for k in sd if k.startswith("query_sel")
    } == {"0"}
    assert sd.keys() == strip_state_dict(model.state_dict(), q).keys()

    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref = model.eval()(x)
        slim = load_model(weights=tmp_path / "slim.safetensors")
        got = slim.model(x)
    assert slim.card == loaded.card
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)
    # fine-tuning from a stripped file: every group starts as group 0
    grown = slim.model.state_dict()
    assert grown["query_feat.weight"].shape[0] == g * q
    torch.testing.assert_close(grown["query_feat.weight"][q : 2 * q], sd["query_feat.weight"])
    torch.testing.assert_close(
        grown[f"query_selection.class_embed.{g - 1}.weight"], sd["query_selection.class_embed.0.weight"]
    )
    assert expand_groups(sd, q, g).keys() == model.state_dict().keys()


def test_strip_refuses_foreign_files(tmp_path):
    from rfdetr_core.checkpoint import save_checkpoint

    plain = save_checkpoint(tmp_path / "plain.safetensors", {"x": torch.ones(2)}, {})
    with pytest.raises(CheckpointError):
        strip_checkpoint(plain, tmp_path / "out.safetensors")
    with pytest.raises(CheckpointError, match="overwrite"):
        strip_checkpoint(FIXTURE, FIXTURE)
