"""One command-line grammar for ``python -m rfdetr_train``, ``accelerate launch -m rfdetr_train`` and the
``rfdetr-train`` / ``rfdetr-mask`` scripts.

A first token naming a subcommand (``train``, ``val``, ``check``, ``eval``, ``predict``) selects it; anything else means
``train``. Every kebab-case flag also accepts its snake_case spelling (``--batch_size 8``).
User errors print one or two lines and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from rfdetr_core.errors import RFDETRError

SUBCOMMANDS = ("train", "val", "check", "eval", "predict")

# subcommand -> "module:function" taking the parsed namespace and returning an exit code. Each lives in the
# package it drives and is imported lazily, so that `--help` and `check` never import training code.
HANDLERS = {
    "train": "rfdetr_train.engine.commands:run_train",
    "val": "rfdetr_train.engine.commands:run_val",
    "check": "rfdetr_train.data.check_command:run_check",
    "eval": "rfdetr_train.evaluation.eval_command:run_eval",
    "predict": "rfdetr_train.predict_command:run_predict",
}


class NotBuiltYetError(RFDETRError):
    """A subcommand whose implementation has not landed in this version."""


PROG = "rfdetr-train"


def score(text: str) -> float:
    """argparse type: a detection score in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is not a score in [0, 1] (scores are probabilities)")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _add_data_flags(p: argparse.ArgumentParser, *, with_data: bool = True) -> None:
    g = p.add_argument_group("data")
    if with_data:
        g.add_argument(
            "--data",
            metavar="PATH",
            help="dataset: COCO JSON, folder of splits, Roboflow export or "
            "YOLO-seg (data.yaml or images/+labels/); default: the built-in synthetic dataset",
        )
    g.add_argument(
        "--images", metavar="DIR", help="image folder when the JSON's file names are relative to it"
    )
    g.add_argument("--train-ann", metavar="JSON", help="training annotations (explicit COCO layout)")
    g.add_argument("--val-ann", metavar="JSON", help="validation annotations (explicit COCO layout)")
    g.add_argument(
        "--skip-invalid",
        action="store_true",
        help="drop invalid annotations (counted and named in the report) instead of stopping",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train, validate and evaluate RF-DETR-Seg models, and check datasets. "
        "Without a subcommand, `train` is run.",
        epilog="Examples:\n  python -m rfdetr_train                       # train seg-tiny on the synthetic dataset\n"
        "  rfdetr-train --data ./my_coco --model seg-nano --weights seg-nano\n"
        "  accelerate launch -m rfdetr_train --data ./my_coco\n"
        "  rfdetr-train check ./my_coco\n"
        "  rfdetr-train val --weights runs/train/best.safetensors --data ./my_coco --split test\n"
        "  rfdetr-train eval --gt val.json --pred results.json\n"
        "  rfdetr-train predict runs/train/best.safetensors photo.jpg photos/ --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,val,check,eval,predict}")

    t = sub.add_parser("train", help="train a model (the default)", description="Train a model.")
    _add_data_flags(t)
    m = t.add_argument_group("model")
    m.add_argument("--model", metavar="VARIANT", help="variant name, e.g. seg-nano (default: seg-tiny)")
    m.add_argument("--weights", metavar="NAME|PATH", help="initial weights: an official name or a file")
    m.add_argument("--resolution", metavar="N|HxW", help="input size (multiple of the variant's grid)")
    m.add_argument("--num-queries", type=int, metavar="N", help="queries per group")
    o = t.add_argument_group("optimisation")
    length = o.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, metavar="N")
    length.add_argument("--steps", type=int, metavar="N", help="fixed budget of optimiser steps")
    o.add_argument("--batch-size", type=int, metavar="N")
    o.add_argument("--grad-accum", type=int, metavar="N", help="gradient accumulation steps")
    o.add_argument("--lr", type=float, metavar="X")
    o.add_argument("--lr-scheduler", choices=("step", "cosine"), help="learning-rate schedule after warm-up")
    o.add_argument(
        "--warmup-steps", type=int, metavar="N", help="linear learning-rate warm-up, optimiser steps"
    )
    o.add_argument("--weight-decay", type=float, metavar="X")
    o.add_argument("--clip-grad-norm", type=float, metavar="X", help="max gradient norm (0 = off)")
    o.add_argument("--ema-decay", type=float, metavar="X")
    o.add_argument("--drop-path", type=float, metavar="X", help="stochastic depth of the backbone blocks")
    o.add_argument(
        "--mixed-precision",
        choices=("auto", "no", "bf16", "fp16"),
        help="auto (default): bf16 on CUDA cards that have it, fp16 on older cards, fp32 on CPU",
    )
    o.add_argument("--seed", type=int, metavar="N")
    o.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1 (default: best available)")
    o.add_argument("--workers", type=int, metavar="N", help="data-loader worker processes")
    o.add_argument(
        "--patience", type=int, metavar="N", help="early stopping: validations without improvement"
    )
    o.add_argument("--min-delta", type=float, metavar="X", help="early stopping: smallest improvement")
    v = t.add_argument_group("validation")
    v.add_argument("--steps-per-validation", type=int, metavar="N", help="validate every N steps")
    v.add_argument("--test-limit", type=int, metavar="N", help="validate on the first N validation images")
    v.add_argument("--eval-max-dets", type=int, metavar="N", help="max detections per image (default 100)")
    v.add_argument(
        "--metric",
        metavar="KIND/KEY",
        help="metric that picks best.safetensors and drives early stopping, e.g. segm/AP50 (default segm/AP)",
    )
    r = t.add_argument_group("run")
    r.add_argument("--log-every", type=int, metavar="N", help="steps between train_log.csv rows (default 10)")
    r.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const=False,
        help="no progress bar (log lines only)",
    )
    r.add_argument("--output", metavar="DIR", help="runs folder (default ./runs)")
    r.add_argument("--name", metavar="NAME", help="run name (default train, train2, ...)")
    r.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="PATH",
        help="resume the newest run, or the run directory / checkpoints/last/ at PATH",
    )
    r.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these options")
    r.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    _add_common(t)

    va = sub.add_parser("val", help="validate weights on a dataset split", description="Validate a model.")
    va.add_argument("--weights", required=True, metavar="PATH", help="checkpoint to validate")
    _add_data_flags(va)
    va.add_argument("--split", choices=("val", "test"), default="val")
    va.add_argument("--batch-size", type=int, metavar="N")
    va.add_argument("--device", metavar="D")
    va.add_argument("--workers", type=int, metavar="N")
    va.add_argument("--eval-max-dets", type=int, metavar="N")
    va.add_argument("--output", metavar="DIR", help="where to write the reports")
    _add_common(va)

    c = sub.add_parser("check", help="check a dataset and print a report", description="Check a dataset.")
    c.add_argument("path", nargs="?", metavar="PATH", help="dataset (any supported layout)")
    _add_data_flags(c, with_data=False)
    c.add_argument("--json", metavar="OUT.json", help="also write the report as JSON")
    _add_common(c)

    e = sub.add_parser("eval", help="COCO metrics of a results file", description="Evaluate COCO results.")
    e.add_argument("--gt", required=True, metavar="GT.json", help="COCO ground-truth annotations")
    e.add_argument("--pred", required=True, metavar="RESULTS.json", help="COCO results (list of detections)")
    e.add_argument("--iou-type", choices=("bbox", "segm", "both"), default="both")
    e.add_argument("--json", metavar="OUT.json", help="write the nested metrics JSON here")
    e.add_argument("--max-dets", type=int, default=100, metavar="N")
    e.add_argument("--no-boundary", action="store_true", help="skip Boundary AP")
    _add_common(e)

    pr = sub.add_parser(
        "predict",
        help="detect and segment objects in images",
        description="Detect and segment objects in image files: write drawn images and COCO results.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pr.add_argument("weights", metavar="WEIGHTS", help="weights file (ours or upstream) or an official name")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    pr.add_argument("--threshold", type=score, default=0.5, help="keep detections scoring above this")
    pr.add_argument("--out", default="predictions", metavar="DIR", help="where drawn images and JSON go")
    pr.add_argument("--json", action="store_true", help="also write DIR/predictions.json (COCO results)")
    pr.add_argument("--no-draw", action="store_true", help="do not write drawn images")
    pr.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass")
    pr.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1 (default: best available)")
    _add_common(pr)
    return parser


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Accept snake_case flag spellings and make ``train`` the default subcommand."""
    out = []
    for tok in argv:
        if tok.startswith("--") and len(tok) > 2:
            name, eq, val = tok[2:].partition("=")
            tok = "--" + name.replace("_", "-") + eq + val
        out.append(tok)
    if not out or (out[0] not in SUBCOMMANDS and out[0] not in ("-h", "--help")):
        out.insert(0, "train")
    return out


def _resolve(command: str) -> Callable[[argparse.Namespace], int]:
    module, func = HANDLERS[command].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:  # a real missing dependency inside the handler: let it surface
            raise
        raise NotBuiltYetError(f"`{command}` is not built yet in this version of rfdetr-train.") from None
    return getattr(mod, func)


def main(argv: Sequence[str] | None = None) -> int:
    argv = normalize_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return int(_resolve(args.command)(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except RFDETRError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
