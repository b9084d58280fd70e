"""CLI / YAML / Python options -> RunConfig, recipes, and the train/val handlers end to end (tiny runs)."""

from __future__ import annotations

import pytest

from rfdetr_core.variants import get_variant
from rfdetr_train.cli import build_parser, normalize_argv
from rfdetr_train.engine import recipes
from rfdetr_train.engine.commands import _options
from rfdetr_train.engine.config import TrainConfig, parse_resolution
from rfdetr_train.engine.options import ConfigError, build_run_config, route


def _parse(*argv):
    return build_parser().parse_args(normalize_argv(list(argv)))


def test_cli_flags_land_in_their_sections():
    args = _parse(
        "--data", "ds", "--steps", "40", "--batch_size", "3", "--eval-max-dets", "50", "--test-limit", "20",
        "--steps-per-validation", "20", "--workers", "0", "--skip-invalid", "--resolution", "96x128",
        "--resume",
    )  # fmt: skip
    run = build_run_config(_options(args))
    assert run.data.path == "ds" and run.data.workers == 0 and run.data.skip_invalid
    assert run.eval.max_dets == 50
    t = run.train
    assert (t.steps, t.batch_size, t.test_limit, t.steps_per_validation) == (40, 3, 20, 20)
    assert t.parsed_resolution() == (96, 128)
    assert t.resume == ""  # --resume alone: the newest run
    assert not _parse().skip_invalid and build_run_config(_options(_parse())).data.skip_invalid is False


def test_engine_flags_reach_the_train_section():
    args = _parse(
        "--mixed-precision", "bf16", "--log-every", "5", "--metric", "segm/AP50", "--drop-path", "0.1",
        "--no-progress", "--lr-scheduler", "cosine", "--warmup-steps", "7", "--weight-decay", "0",
        "--clip-grad-norm", "0.5",
    )  # fmt: skip
    t = build_run_config(_options(args)).train
    assert (t.mixed_precision, t.log_every, t.metric, t.drop_path, t.progress) == (
        "bf16",
        5,
        "segm/AP50",
        0.1,
        False,
    )
    assert (t.lr_scheduler, t.warmup_steps, t.weight_decay, t.clip_grad_norm) == ("cosine", 7, 0.0, 0.5)
    # left out, they keep their defaults
    t = build_run_config(_options(_parse())).train
    assert (t.mixed_precision, t.log_every, t.metric, t.progress) == ("auto", 10, "segm/AP", True)


def test_compile_options_reach_the_train_section_and_need_compile():
    t = build_run_config(
        _options(_parse("--compile", "--compile-mode", "reduce-overhead", "--activation-memory-budget", "0.5"))
    ).train
    assert (t.compile, t.compile_mode, t.activation_memory_budget) == (True, "reduce-overhead", 0.5)
    t = build_run_config(_options(_parse())).train
    assert (t.compile, t.compile_mode, t.activation_memory_budget) == (False, "default", None)
    assert not t.compile_criterion
    t = build_run_config(_options(_parse("--compile-criterion"))).train
    assert t.compile_criterion and recipes.criterion_options(t)["compile_losses"] is True
    with pytest.raises(ConfigError, match="--compile"):
        build_run_config(_options(_parse("--compile-mode", "reduce-overhead")))
    with pytest.raises(ConfigError, match="--compile"):
        build_run_config({"activation_memory_budget": 0.5})
    with pytest.raises(ConfigError, match="activation_memory_budget"):
        build_run_config({"compile": True, "activation_memory_budget": 1.5})


@pytest.mark.parametrize("metric", ["segm", "segm/AP5", "mask/AP", "bbox/"])
def test_unknown_metric_is_named(metric):
    with pytest.raises(ConfigError, match="segm/AP50"):
        build_run_config({"metric": metric})


def test_yaml_file_nested_or_flat_and_cli_wins(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "lr: 0.002\nmax_dets: 30\ntrain:\n  steps: 7\n  warmup_steps: 3\ndata:\n  transforms: none\n"
    )
    run = build_run_config({"steps": 9}, f)
    assert (run.train.lr, run.train.steps, run.train.warmup_steps) == (0.002, 9, 3)
    assert run.eval.max_dets == 30 and run.data.transforms == "none"


def test_unknown_and_invalid_options_are_named():
    with pytest.raises(ConfigError, match="'batch_sise'.*batch_size"):
        route({"batch_sise": 4})
    with pytest.raises(ConfigError, match="batch_size"):
        build_run_config({"batch_size": 0})
    with pytest.raises(ConfigError, match="epochs.*steps|either"):
        build_run_config({"epochs": 2, "steps": 3})
    with pytest.raises(Exception, match="HxW"):
        parse_resolution("12by3")


def test_recipes_fill_only_what_is_unset():
    tiny = get_variant("seg-tiny")
    r = recipes.resolve(TrainConfig(), tiny)
    assert r.recipe == "scratch" and r.steps == recipes.SCRATCH["steps"] and r.epochs is None
    assert r.lr_vit_layer_decay == 1.0
    nano = get_variant("seg-nano")
    f = recipes.resolve(TrainConfig(weights="seg-nano", lr=2e-4, batch_size=2), nano)
    assert f.recipe == "finetune" and f.epochs == 100 and f.steps is None
    assert (f.batch_size, f.grad_accum, f.lr_vit_layer_decay, f.lr_component_decay) == (2, 4, 0.8, 0.7)
    assert f.lr_encoder == pytest.approx(3e-4)  # upstream ratio 1.5 kept when only --lr is given
    assert (f.ema_decay, f.ema_tau, f.clip_grad_norm) == (0.993, 100.0, 0.1)
    assert recipes.resolve(TrainConfig(epochs=3), tiny).steps is None


def test_recipe_loss_weights_reach_the_criterion():
    from rfdetr_train.engine.setup import build_criterion_for

    tiny = get_variant("seg-tiny")
    scratch = build_criterion_for(tiny, 3, **recipes.criterion_options(recipes.resolve(TrainConfig(), tiny)))
    assert scratch.weight_for("loss_ce_enc") == recipes.SCRATCH_LOSS_WEIGHTS.ce
    assert scratch.weight_for("loss_mask_dice_0") == recipes.SCRATCH_LOSS_WEIGHTS.mask_dice
    assert scratch.weight_for("loss_ce") > scratch.weight_for("loss_mask_ce")  # classes up, masks down
    nano = get_variant("seg-nano")
    finetune = recipes.resolve(TrainConfig(weights="seg-nano"), nano)
    upstream = build_criterion_for(nano, 80, **recipes.criterion_options(finetune)).weight_dict
    assert upstream == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_mask_ce": 5.0,
                        "loss_mask_dice": 5.0}  # fmt: skip


@pytest.mark.parametrize("name", ["notes.pth", "notes.safetensors"])
@pytest.mark.parametrize("command", [["val"], []])
def test_a_file_that_is_no_checkpoint_gives_one_line(tmp_path, capsys, name, command):
    from rfdetr_train.cli import main

    path = tmp_path / name
    path.write_text("these are my notes, not weights\n")
    assert main([*command, "--weights", str(path), "--output", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert "is a text file" in err and "truncated or corrupt" in err and "download or export it again" in err
