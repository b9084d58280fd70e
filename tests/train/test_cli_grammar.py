"""The one rfdetr-train grammar: subcommand dispatch, default `train`, snake_case flags, --help everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from rfdetr_core.errors import RFDETRError
from rfdetr_train import cli


@pytest.fixture
def recorder(monkeypatch):
    """Point every subcommand at a fake handler that records the parsed namespace."""
    calls: list = []
    mod = types.ModuleType("fake_rfdetr_handlers")

    def make(name):
        def handler(args):
            calls.append((name, args))
            if getattr(args, "name", None) == "boom":
                raise RFDETRError("the dataset folder is missing; pass --data")
            return 0

        return handler

    for name in cli.SUBCOMMANDS:
        setattr(mod, f"run_{name}", make(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(cli, "HANDLERS", {n: f"{mod.__name__}:run_{n}" for n in cli.SUBCOMMANDS})
    return calls


def test_no_subcommand_means_train(recorder):
    assert cli.main([]) == 0
    assert cli.main(["--data", "ds", "--epochs", "3"]) == 0
    assert [c[0] for c in recorder] == ["train", "train"]
    assert recorder[1][1].data == "ds" and recorder[1][1].epochs == 3


def test_subcommands_dispatch(recorder):
    cli.main(["val", "--weights", "w.safetensors", "--split", "test"])
    cli.main(["check", "some/folder"])
    cli.main(["eval", "--gt", "gt.json", "--pred", "p.json", "--iou-type", "segm"])
    cli.main(["train", "--steps", "5"])
    names = [c[0] for c in recorder]
    assert names == ["val", "check", "eval", "train"]
    assert recorder[0][1].split == "test" and recorder[1][1].path == "some/folder"
    assert recorder[2][1].iou_type == "segm" and recorder[3][1].steps == 5


def test_snake_case_flags_are_accepted(recorder):
    cli.main(["--batch_size", "8", "--grad_accum=2", "--steps_per_validation", "20", "--test_limit", "20"])
    cli.main(["eval", "--gt", "g", "--pred", "p", "--iou_type", "bbox", "--max_dets", "50"])
    args = recorder[0][1]
    assert (args.batch_size, args.grad_accum, args.steps_per_validation, args.test_limit) == (8, 2, 20, 20)
    assert recorder[1][1].iou_type == "bbox" and recorder[1][1].max_dets == 50


def test_resume_forms(recorder):
    cli.main(["--resume"])
    cli.main(["--resume", "runs/train3"])
    cli.main([])
    assert [c[1].resume for c in recorder] == ["", "runs/train3", None]


def test_epochs_and_steps_are_exclusive(recorder, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--epochs", "2", "--steps", "10"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_user_errors_print_one_line_and_exit_1(recorder, capsys):
    assert cli.main(["--name", "boom"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "rfdetr-train train: error: the dataset folder is missing; pass --data"
    with pytest.raises(RFDETRError):  # --debug shows the traceback
        cli.main(["--name", "boom", "--debug"])


def test_val_on_a_run_folder_names_its_weights_file(tmp_path, capsys):
    """`val --weights runs/train` (a folder) answers with core's run-folder message, not "no runner"."""
    run = tmp_path / "train"
    run.mkdir()
    (run / "best.safetensors").write_bytes(b"x")
    assert cli.main(["val", "--weights", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"rfdetr-train val: error: {run} is a training run folder; pass its weights file: {run / 'best.safetensors'}."
    ), err


def test_missing_handler_module_is_reported(monkeypatch, capsys):
    monkeypatch.setattr(cli, "HANDLERS", {**cli.HANDLERS, "check": "rfdetr_train.no_such_module:run"})
    assert cli.main(["check", "x"]) == 1
    assert "`check` is not built yet" in capsys.readouterr().err


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    "argv",
    [
        ["rfdetr-train", "--help"],
        ["rfdetr-mask", "--help"],
        ["rfdetr-train", "train", "--help"],
        ["rfdetr-train", "val", "--help"],
        ["rfdetr-train", "check", "--help"],
        ["rfdetr-train", "eval", "--help"],
        [sys.executable, "-m", "rfdetr_train", "--help"],
        ["rfdetr-export", "--help"],
        ["rfdetr-serve", "--help"],
    ],
    ids=lambda a: " ".join(os.path.basename(x) for x in a),
)
def test_help_of_every_entry_point(argv):
    bindir = os.path.dirname(sys.executable)
    if not argv[0].startswith("/"):
        argv = [os.path.join(bindir, argv[0]), *argv[1:]]
    proc = _run(*argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:")
    assert "Traceback" not in proc.stderr


def test_top_level_help_lists_subcommands():
    proc = _run(os.path.join(os.path.dirname(sys.executable), "rfdetr-mask"), "--help")
    for name in cli.SUBCOMMANDS:
        assert name in proc.stdout
    assert proc.stdout.startswith("usage: rfdetr-train")


def _subparsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return sub.choices


def test_every_option_has_help_and_every_value_option_shows_its_default():
    for name, p in _subparsers().items():
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flag = action.option_strings[-1]
            assert action.help, f"{name} {flag} has no help line"
            if action.nargs != 0 and not action.required and action.dest not in ("resume", "config", "json"):
                assert "default" in action.help, f"{name} {flag} does not show its default: {action.help!r}"


def test_recipe_dependent_defaults_show_both_recipes():
    from rfdetr_train.engine.recipes import FINETUNE, SCRATCH

    helps = {a.dest: a.help for a in _subparsers()["train"]._actions}
    assert f"finetune recipe {FINETUNE['lr']}, scratch recipe {SCRATCH['lr']}" in helps["lr"]
    assert f"finetune recipe {FINETUNE['grad_accum']}, scratch recipe {SCRATCH['grad_accum']}" in helps["grad_accum"]
    assert str(SCRATCH["steps"]) in helps["steps"] and str(FINETUNE["epochs"]) in helps["epochs"]


def test_a_dataset_path_where_a_subcommand_was_expected_suggests_data(recorder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([str(tmp_path)])
    assert exc.value.code == 2 and f"--data {tmp_path}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["chek", "ds"])
    assert "did you mean `rfdetr-train check`" in capsys.readouterr().err
    assert not recorder


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--epoch", "3"], "unrecognized option --epoch; did you mean --epochs?"),
        (["--batchsize", "3"], "did you mean --batch-size"),
        (["eval", "--gt", "g", "--pred", "p", "--max-det", "5"], "did you mean --max-dets"),
    ],
)
def test_flag_typos_are_errors_with_a_suggestion_and_the_subcommand_usage(recorder, capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and expected in err
    assert "usage: rfdetr-train " + ("eval" if argv[0] == "eval" else "train") in err
    assert not recorder  # never an accepted prefix


def test_check_takes_data_like_train_and_val(recorder, capsys):
    cli.main(["check", "--data", "some/folder"])
    cli.main(["check", "some/folder"])
    assert [c[1].path for c in recorder] == ["some/folder", "some/folder"]
    with pytest.raises(SystemExit):
        cli.main(["check", "a", "--data", "b"])
    assert "two datasets" in capsys.readouterr().err
