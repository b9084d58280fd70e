"""A tiny end-to-end run: run directory layout, weights files loadable by RFDETR.from_checkpoint, periodic
validation with the per-class table, the `val` subcommand, and --resume path errors."""

from __future__ import annotations

import json

import pytest
import torch

from rfdetr_core.checkpoint import read_metadata
from rfdetr_train.cli import main
from rfdetr_train.data.synthetic import generate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), seed=7, sizes={"train": 4, "val": 3, "test": 2})


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    import rfdetr_train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs")
    result = rfdetr_train.train(
        data=str(dataset), model="seg-tiny", output=str(out), steps=4, batch_size=2, resolution=64, workers=0,
        steps_per_validation=2, test_limit=2, progress=False, plots=False, gallery_images=0,
    )  # fmt: skip
    return result


def test_run_directory_layout_and_weights(trained, dataset):
    run = trained.run_dir
    assert run.name == "train" and trained.step == 4 and trained.stopped == "completed"
    for name in ("config.yaml", "last.safetensors", "best.safetensors", "results.csv", "metrics.json",
                 "train_log.csv", "per_class_segm.csv", "checkpoints/last/state.json",
                 "checkpoints/last/model.safetensors", "checkpoints/last/optimizer.safetensors",
                 "checkpoints/last/ema.safetensors", "checkpoints/last/rng_rank0.safetensors"):  # fmt: skip
        assert (run / name).is_file(), name
    assert not list(run.rglob("*.pt*")) and not list(run.rglob("*.pkl"))
    # validated every 2 steps on the first 2 validation images
    results = (run / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in results[1:]] == ["2", "4"]
    assert [h[0] for h in trained.history] == [2, 4]
    meta = read_metadata(run / "best.safetensors")
    assert meta["variant"] == "seg-tiny" and meta["resolution"] == [64, 64]
    names = [c["name"] for c in meta["class_map"]["classes"]]
    assert names == ["circle", "triangle", "star"]
    assert json.loads((run / "metrics.json").read_text())["last"]["step"] == 4

    from rfdetr_core.predict import RFDETR

    model = RFDETR.from_checkpoint(run / "last.safetensors", device="cpu")
    assert model.class_names == names and model.resolution == (64, 64)
    dets = model.predict(str(dataset / "images" / "val" / "00000.jpg"), threshold=0.0)
    assert dets is not None


def test_periodic_validation_prints_per_class_table(dataset, tmp_path, capsys):
    code = main(["--data", str(dataset), "--model", "seg-tiny", "--output", str(tmp_path), "--steps", "2", "--batch-size", "2",
                 "--resolution", "64", "--workers", "0", "--steps-per-validation", "1", "--test-limit", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "validation at step 1" in out and "validation at step 2" in out
    assert out.count("per class (segm)") == 2 and "triangle" in out
    assert "AP50 over time" in out  # the end-of-run table, one row per validation


def test_val_subcommand_and_resume_errors(trained, dataset, tmp_path, capsys):
    code = main(["val", "--weights", str(trained.run_dir / "best.safetensors"), "--data", str(dataset),
                 "--split", "test", "--workers", "0", "--output", str(tmp_path / "v")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "per class (segm)" in out and (tmp_path / "v" / "metrics.json").is_file()
    code = main(["--resume", str(trained.run_dir / "best.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and "--weights" in err
    code = main(["--resume", "--output", str(tmp_path / "empty")])
    assert code == 1 and "no run" in capsys.readouterr().err


def test_finetune_from_weights_file_uses_the_finetune_recipe(trained, dataset, tmp_path, monkeypatch):
    import yaml

    import rfdetr_core.weights.files as weights_files
    import rfdetr_train

    reads = []
    real_read = weights_files.read_weights_file
    monkeypatch.setattr(
        weights_files, "read_weights_file", lambda path: reads.append(path) or real_read(path)
    )
    result = rfdetr_train.train(
        data=str(dataset), output=str(tmp_path), weights=str(trained.run_dir / "best.safetensors"),
        steps=1, batch_size=2, grad_accum=1, workers=0, progress=False, plots=False, gallery_images=0,
    )  # fmt: skip
    cfg = yaml.safe_load((result.run_dir / "config.yaml").read_text())["train"]
    assert cfg["recipe"] == "finetune" and cfg["lr_vit_layer_decay"] == 0.8 and cfg["clip_grad_norm"] == 0.1
    # variant and resolution come from the file
    assert read_metadata(result.last_weights)["resolution"] == [64, 64]
    assert read_metadata(result.last_weights)["variant"] == "seg-tiny"
    # without --model, the variant comes from the file, and the file is read once for variant and weights
    assert len(reads) == 1


def test_val_uses_the_validation_defaults_of_training(trained, dataset, tmp_path, monkeypatch):
    import rfdetr_train
    import rfdetr_train.data as data_pkg

    batches = []
    real = data_pkg.build_val_loader
    monkeypatch.setattr(
        data_pkg, "build_val_loader", lambda *a, **k: batches.append(k["batch_size"]) or real(*a, **k)
    )
    weights = str(trained.run_dir / "best.safetensors")
    rfdetr_train.val(weights, data=str(dataset), workers=0, output=str(tmp_path / "a"))
    rfdetr_train.val(weights, data=str(dataset), workers=0, output=str(tmp_path / "b"), val_batch_size=3)
    # training validates with val_batch_size, else twice the recipe's batch (4 for seg-tiny's scratch recipe)
    assert batches == [8, 3]


@pytest.mark.slow
def test_two_processes_with_gloo(dataset, tmp_path):
    """DDP on CPU (torchrun, gloo): sharded batches, no unused-parameter error, gathered validation, per-rank
    RNG in the checkpoint."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rfdetr_train",
           "--data", str(dataset), "--model", "seg-tiny", "--output", str(tmp_path), "--steps", "3", "--batch-size", "1",
           "--resolution", "64", "--workers", "0", "--steps-per-validation", "3", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("validation at step 3") == 1  # main process only
    state = json.loads((tmp_path / "train" / "checkpoints" / "last" / "state.json").read_text())
    assert state["num_processes"] == 2 and state["sampler"]["world_size"] == 2 and len(state["rng"]) == 2
    assert (tmp_path / "train" / "checkpoints" / "last" / "rng_rank1.safetensors").is_file()


def test_drop_path_reaches_the_backbone(dataset, tmp_path, monkeypatch):
    import rfdetr_train
    from rfdetr_core.models import RFDETRModel

    rates = []
    original = RFDETRModel.set_drop_path

    def spy(self, rate):
        rates.append(rate)
        original(self, rate)

    monkeypatch.setattr(RFDETRModel, "set_drop_path", spy)
    rfdetr_train.train(
        data=str(dataset), model="seg-tiny", output=str(tmp_path), steps=1, batch_size=2, resolution=64,
        workers=0, drop_path=0.1, progress=False, plots=False, gallery_images=0,
    )  # fmt: skip
    assert rates == [0.1]


def test_quick_look_stops_after_the_first_validation_and_per_class_last(dataset, tmp_path, capsys, caplog):
    """`--steps-per-validation 2 --test-limit 2` without --steps: 2 steps, one validation, one table."""
    import logging

    caplog.set_level(logging.INFO, logger="rfdetr_train")
    code = main(["--data", str(dataset), "--model", "seg-tiny", "--output", str(tmp_path), "--batch-size", "2", "--resolution", "64",
                 "--workers", "0", "--steps-per-validation", "2", "--test-limit", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "validation at step 2" in out and "validation at step 4" not in out
    assert out.count("per class (segm)") == 1
    assert "quick look" in caplog.text and "stops after the first validation, at step 2" in caplog.text
    code = main(["--data", str(dataset), "--model", "seg-tiny", "--output", str(tmp_path), "--steps", "3", "--batch-size", "2",
                 "--resolution", "64", "--workers", "0", "--steps-per-validation", "1", "--test-limit", "2",
                 "--per-class", "last"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "validation at step 3" in out
    assert out.count("per class (segm)") == 1  # only after the last of three validations


def test_recipe_warmup_scales_with_a_short_run_and_quick_look_length():
    from rfdetr_core.variants import get_variant
    from rfdetr_train.engine import recipes
    from rfdetr_train.engine.config import TrainConfig

    tiny, nano = get_variant("seg-tiny"), get_variant("seg-nano")
    full = recipes.resolve(TrainConfig(), tiny)
    assert (full.steps, full.warmup_steps) == (recipes.SCRATCH["steps"], recipes.SCRATCH["warmup_steps"])
    short = recipes.resolve(TrainConfig(steps=68), tiny)
    assert short.warmup_steps == 2  # the recipe's 100 of 3400 steps, scaled to 68
    assert recipes.resolve(TrainConfig(steps=68, warmup_steps=30), tiny).warmup_steps == 30  # explicit wins
    look = recipes.resolve(TrainConfig(test_limit=20, steps_per_validation=20), tiny)
    assert look.steps == 20
    assert recipes.resolve(TrainConfig(test_limit=20), tiny).steps == recipes.SCRATCH["steps_per_validation"]
    fine = recipes.resolve(TrainConfig(test_limit=20, weights="w.pth"), nano)
    assert (fine.epochs, fine.steps) == (1, None)  # validation once per epoch: one epoch
    assert recipes.resolve(TrainConfig(test_limit=20, steps=50), tiny).steps == 50  # a length wins


def test_per_class_accepts_the_old_booleans():
    from rfdetr_train.evaluation.config import EvalConfig

    assert EvalConfig(per_class=True).per_class == "every" and EvalConfig(per_class=False).per_class == "never"
    assert EvalConfig(per_class="last").per_class == "last"
