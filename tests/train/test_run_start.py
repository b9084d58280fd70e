"""What a run starts from and what it says about itself (issue 16.1 and 16.3): real data gets a pretrained
model, a run that cannot start leaves no run folder, resume says where it is, a finished run names its best
weights, --skip-invalid says what it dropped. Nothing is downloaded: the weights URL points at a missing
local folder."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from rfdetr_core.variants import get_variant
from rfdetr_train.cli import main
from rfdetr_train.data.synthetic import generate
from rfdetr_train.engine import recipes
from rfdetr_train.engine.config import TrainConfig
from rfdetr_train.engine.starting_point import choose_starting_point

TINY = ["--resolution", "64", "--batch-size", "2", "--workers", "0", "--no-progress", "--per-class", "never"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), seed=3, sizes={"train": 4, "val": 2})


@pytest.fixture(autouse=True)
def _offline_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("RFDETR_WEIGHTS_URL", (tmp_path / "no_mirror").as_uri())
    monkeypatch.setenv("RFDETR_HOME", str(tmp_path / "home"))
    torch.set_num_threads(1)


def _recipe(model, weights, has_data):
    start = choose_starting_point(model, weights, has_data)
    variant = get_variant(start.model or "seg-tiny")
    return start, recipes.resolve(TrainConfig(model=start.model, weights=start.weights), variant).recipe


def test_defaults_per_recipe():
    start, recipe = _recipe(None, None, has_data=True)  # real data: a pretrained model, fine-tuned
    assert (start.model, start.weights, recipe) == ("seg-nano", "seg-nano", "finetune")
    assert "smallest segmentation variant with published weights" in start.note and "--model" in start.note
    start, recipe = _recipe(None, None, has_data=False)  # the built-in demo is unchanged
    assert (start.model, start.weights, recipe, start.note) == (None, None, "scratch", None)
    start, recipe = _recipe("seg-tiny", None, has_data=True)  # asked for: seg-tiny from scratch
    assert (start.weights, recipe) == (None, "scratch")
    start, recipe = _recipe("seg-small", None, has_data=True)  # a published variant: its own weights
    assert (start.model, start.weights, recipe) == ("seg-small", "seg-small", "finetune")
    start, recipe = _recipe("seg-small", "none", has_data=True)  # random weights, when asked
    assert (start.model, start.weights, recipe) == ("seg-small", None, "scratch")
    start, recipe = _recipe(None, "None", has_data=True)
    assert (start.model, start.weights, recipe) == ("seg-nano", None, "scratch")
    start, recipe = _recipe(None, "my.pth", has_data=True)  # a file: its own variant, fine-tuned
    assert (start.model, start.weights, recipe) == (None, "my.pth", "finetune")


def _runs(out):
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


@pytest.mark.parametrize(
    ("model", "names"),
    [(None, ("rf-detr-seg-nano.pt", "rf-detr-seg-n-ft.pth")), ("seg-small", ("rf-detr-seg-small.pt",))],
)
def test_offline_default_names_the_file_and_leaves_no_run_folder(dataset, tmp_path, capsys, model, names):
    out = tmp_path / "runs"
    args = ["--data", str(dataset), "--output", str(out), "--steps", "1", *TINY]
    code = main(args + (["--model", model] if model else []))
    captured = capsys.readouterr()
    assert code == 1
    for name in names:  # the file to fetch, under both accepted names
        assert name in captured.err
    assert "--weights none" in captured.err and "Traceback" not in captured.err
    if model is None:
        assert "fine-tuning seg-nano from its official COCO weights" in captured.out
    assert _runs(out) == []


def test_early_failures_create_no_run_folder_and_take_no_name(dataset, tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    base = [
        "--output",
        str(out),
        "--model",
        "seg-tiny",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--workers",
        "0",
    ]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.json").write_text("{not json")
    assert main(["--data", str(tmp_path / "nowhere"), *base]) == 1  # wrong --data
    assert main(["--data", str(dataset), "--resolution", "65", *base]) == 1  # bad resolution
    assert main(["--data", str(bad), *base]) == 1  # dataset error
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert main(["--data", str(dataset), "--resolution", "64", "--wandb", *base]) == 1
    err = capsys.readouterr().err
    assert "wandb" in err and "65" in err
    assert _runs(out) == []


def test_a_taken_name_is_refused_before_the_data_is_read(tmp_path, capsys):
    out = tmp_path / "runs"
    taken = out / "exp"
    taken.mkdir(parents=True)
    (taken / "config.yaml").write_text("an earlier run\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.json").write_text("{not json")  # a dataset error, if the data were read first
    args = ["--data", str(bad), "--output", str(out), "--name", "exp", "--model", "seg-tiny", "--steps", "1"]
    assert main([*args, "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert f"Run directory {taken} already exists and is not empty" in err
    assert "Pick another --name" in err and f"--resume {taken}" in err
    assert "train.json" not in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert _runs(out) == ["exp"] and (taken / "config.yaml").read_text() == "an earlier run\n"  # untouched


def test_final_line_resume_messages_and_a_finished_run(dataset, tmp_path, capsys):
    import yaml

    out = tmp_path / "runs"
    args = ["--data", str(dataset), "--model", "seg-tiny", "--output", str(out), *TINY]
    assert main([*args, "--steps", "2", "--steps-per-validation", "2"]) == 0
    run = out / "train"
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert last_line.startswith(f"best weights: {run / 'best.safetensors'} (segm/AP ")
    assert last_line.endswith(" at step 2)") and f"{metrics['best']['segm']['AP']:.4f}" in last_line

    # a finished run: nothing to resume, and how to train further
    assert main(["--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert "has finished (step 2 of 2)" in err and f"--weights {run / 'last.safetensors'}" in err

    # the same run as if it had stopped after step 2 of 4: resuming says where, and what it ignores
    state_file = run / "checkpoints" / "last" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "total_steps": 4, "reason": "validation"}))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["steps"] = 4
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["--resume", str(run), "--steps", "90"]) == 0
    text = capsys.readouterr().out
    assert f"resuming {run} at step 2 of 4" in text
    assert "--steps 90 is ignored" in text and "(steps 4)" in text and "--weights" in text
    assert "from scratch" not in text and "(scratch recipe, resuming at step 2 of 4)" in text
    assert text.strip().splitlines()[-1].startswith(f"best weights: {run / 'best.safetensors'}")
    assert _runs(out) == ["train"]


def test_skip_invalid_says_what_it_dropped(dataset, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    train = json.loads((data / "train.json").read_text())
    bad_ids = [a["id"] for a in train["annotations"][:4]]
    for a in train["annotations"][:4]:
        a["category_id"] = 99
    (data / "train.json").write_text(json.dumps(train))
    out = tmp_path / "runs"
    args = ["--data", str(data), "--model", "seg-tiny", "--output", str(out), "--steps", "1", *TINY]
    assert main(args) == 1
    assert "--skip-invalid" in capsys.readouterr().err  # it can help here, so it is suggested
    assert main([*args, "--skip-invalid"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("--skip-invalid dropped")]
    shown = ", ".join(f"ann {i}" for i in bad_ids[:3])
    assert lines == [f"--skip-invalid dropped 4 annotation(s)/image(s): 4 unknown-category ({shown}, ...)"]


def test_skip_invalid_is_not_suggested_where_it_cannot_help(dataset, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "val.json").write_text("{broken")
    args = ["--data", str(data), "--model", "seg-tiny", "--output", str(tmp_path / "runs"), "--steps", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "json-parse" in err or "not valid JSON" in err or "parse" in err
    assert "--skip-invalid cannot help" in err and "or pass --skip-invalid" not in err
    assert main(["check", str(data), "--skip-invalid"]) == 1
    err = capsys.readouterr().err
    assert "--skip-invalid cannot help with json-parse" in err and "train with --skip-invalid" not in err


@pytest.mark.slow
def test_weights_path_to_an_upstream_file_fine_tunes_directly(dataset, tmp_path, capsys):
    """A downloaded official file passed as --weights (a random-init stand-in in upstream's layout, made by
    the upstream package as scripts/make_upstream_random_checkpoint.py does) fine-tunes without renaming."""
    pytest.importorskip("rfdetr")
    import rfdetr.config as upstream_config
    import rfdetr.models as upstream_models

    cfg = upstream_config.RFDETRSegNanoConfig(pretrain_weights=None, device="cpu")
    torch.manual_seed(0)
    model = upstream_models.build_model_from_config(cfg)
    path = tmp_path / "rf-detr-seg-n-ft.pth"  # the name the official URL gives
    args = {"resolution": int(cfg.resolution), "num_classes": int(cfg.num_classes)}
    torch.save({"model": model.state_dict(), "model_name": "RFDETRSegNano", "args": args}, path)
    del model
    out = tmp_path / "runs"
    code = main(["--data", str(dataset), "--weights", str(path), "--output", str(out), "--steps", "1",
                 "--steps-per-validation", "1", "--test-limit", "1", "--grad-accum", "1", *TINY[:1], "96",
                 *TINY[2:]])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    assert f"training seg-nano (finetune recipe, from {path}) at 96x96" in text
    assert text.strip().splitlines()[-1].startswith(f"best weights: {out / 'train' / 'best.safetensors'}")
