"""One command-line grammar for ``python -m rfdetr_train``, ``accelerate launch -m rfdetr_train`` and the
``rfdetr-train`` / ``rfdetr-mask`` scripts.

A first token naming a subcommand (``train``, ``val``, ``check``, ``eval``, ``predict``, ``strip``) selects it; anything else means
``train``. Every kebab-case flag also accepts its snake_case spelling (``--batch_size 8``).
User errors print one or two lines and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Callable, Sequence

from rfdetr_core.errors import RFDETRError

SUBCOMMANDS = ("train", "val", "check", "eval", "predict", "strip")

# subcommand -> "module:function" taking the parsed namespace and returning an exit code. Each lives in the
# package it drives and is imported lazily, so that `--help` and `check` never import training code.
HANDLERS = {
    "train": "rfdetr_train.engine.commands:run_train",
    "val": "rfdetr_train.engine.commands:run_val",
    "check": "rfdetr_train.data.check_command:run_check",
    "eval": "rfdetr_train.evaluation.eval_command:run_eval",
    "predict": "rfdetr_train.predict_command:run_predict",
    "strip": "rfdetr_train.strip_command:run_strip",
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


# Defaults that no config field or recipe table holds as one value: what decides them, as --help shows it.
DERIVED_DEFAULTS = {
    "data": "the built-in synthetic dataset",
    "images": "found from --data",
    "train_ann": "found from --data",
    "val_ann": "found from --data",
    "model": "the --weights file's variant; else seg-nano with --data, seg-tiny without (the demo)",
    "weights": "the variant's official COCO weights (seg-nano with --data); seg-tiny: random",
    "resolution": "the weights file's, else the variant's",
    "num_queries": "the variant's",
    "device": "CUDA when available, else CPU",
    "workers": "0 for CPU training on <= 2 cores, else min(4, CPUs - 1)",
    "steps_per_validation": "once per epoch; scratch recipe 400",
    "test_limit": "every validation image",
    "patience": "off",
    "name": "train, train2, ... (the first free name)",
    "output": "runs",
    "val_batch_size": "2 x --batch-size",
}


def _recipe_default(key: str) -> str | None:
    """``"finetune X, scratch Y"`` for a field the training recipes set, else ``None``."""
    from rfdetr_train.engine.recipes import FINETUNE, SCRATCH

    if key == "epochs":
        return f"finetune recipe {FINETUNE['epochs']}; the scratch recipe counts --steps"
    if key == "steps":
        return f"scratch recipe {SCRATCH['steps']}; the finetune recipe counts --epochs"
    if key not in FINETUNE or key not in SCRATCH:
        return None
    return f"finetune recipe {FINETUNE[key]}, scratch recipe {SCRATCH[key]}"


def _config_default(key: str):
    """The fixed default of a config field of that name (training, data or evaluation section)."""
    from rfdetr_train.config import RunConfig

    for section in RunConfig.model_fields.values():
        fields = section.annotation.model_fields
        if key in fields and fields[key].default is not None:
            return fields[key].default
    return None


def show_defaults(parser: argparse.ArgumentParser, overrides: dict[str, str] | None = None) -> None:
    """Append ``(default: ...)`` to the help of every value option of ``parser`` that does not say it yet:
    the argparse default, else ``overrides``, else the recipes' values, else the config field's default."""
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.dest == "help" or action.required:
            continue
        if action.help is None or "default" in action.help:
            continue
        key = {"eval_max_dets": "max_dets"}.get(action.dest, action.dest)  # CLI name -> config field
        if action.default not in (None, argparse.SUPPRESS):
            text = str(action.default)
        elif overrides and key in overrides:
            text = overrides[key]
        elif key in DERIVED_DEFAULTS:
            text = DERIVED_DEFAULTS[key]
        else:
            text = _recipe_default(key) or (
                str(_config_default(key)) if _config_default(key) is not None else None
            )
        if text is not None:
            action.help = f"{action.help} (default: {text})"


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
    parser = _Parser(
        prog=PROG,
        description="Train, validate and evaluate RF-DETR-Seg models, and check datasets. "
        "Without a subcommand, `train` is run.",
        epilog="Examples:\n  python -m rfdetr_train                       # train seg-tiny on the synthetic dataset\n"
        "  rfdetr-train --data ./my_coco                 # fine-tune seg-nano from its COCO weights\n"
        "  accelerate launch -m rfdetr_train --data ./my_coco\n"
        "  rfdetr-train check ./my_coco\n"
        "  rfdetr-train val --weights runs/train/best.safetensors --data ./my_coco --split test\n"
        "  rfdetr-train eval --gt val.json --pred results.json\n"
        "  rfdetr-train predict runs/train/best.safetensors photo.jpg photos/ --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}", parser_class=_Parser
    )

    t = sub.add_parser(
        "train",
        help="train a model (the default)",
        description="Train a model. With --data and neither --model nor --weights, seg-nano is fine-tuned "
        "from its official COCO weights (the smallest segmentation variant with published weights); without "
        "--data, seg-tiny is trained from scratch on the synthetic dataset (the CPU demo). Options left out "
        "take the recipe's value: the finetune recipe (upstream RF-DETR's) for runs that start from weights, "
        "the scratch recipe for a model trained from random weights (seg-tiny, --weights none).",
    )
    _add_data_flags(t)
    m = t.add_argument_group("model")
    m.add_argument(
        "--model",
        metavar="VARIANT",
        help="variant name, e.g. seg-small; a published one starts from its weights",
    )
    m.add_argument(
        "--weights",
        metavar="NAME|PATH|none",
        help="initial weights: an official name, a file (ours or upstream's .pth), or none (random init)",
    )
    m.add_argument("--resolution", metavar="N|HxW", help="input size (multiple of the variant's grid)")
    m.add_argument("--num-queries", type=int, metavar="N", help="queries per group")
    o = t.add_argument_group("optimisation")
    length = o.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, metavar="N", help="passes over the training split")
    length.add_argument("--steps", type=int, metavar="N", help="fixed budget of optimiser steps")
    o.add_argument("--batch-size", type=int, metavar="N", help="images per step and process")
    o.add_argument("--grad-accum", type=int, metavar="N", help="gradient accumulation steps")
    o.add_argument("--lr", type=float, metavar="X", help="learning rate (the encoder's scales with it)")
    o.add_argument("--lr-scheduler", choices=("step", "cosine"), help="learning-rate schedule after warm-up")
    o.add_argument(
        "--warmup-steps", type=int, metavar="N", help="linear learning-rate warm-up, optimiser steps"
    )
    o.add_argument("--weight-decay", type=float, metavar="X", help="AdamW weight decay")
    o.add_argument("--clip-grad-norm", type=float, metavar="X", help="max gradient norm (0 = off)")
    o.add_argument("--ema-decay", type=float, metavar="X", help="decay of the weights' moving average")
    o.add_argument("--drop-path", type=float, metavar="X", help="stochastic depth of the backbone blocks")
    o.add_argument(
        "--mixed-precision",
        choices=("auto", "no", "bf16", "fp16"),
        help="auto (default): bf16 on CUDA cards that have it, fp16 on older cards, fp32 on CPU",
    )
    o.add_argument("--seed", type=int, metavar="N", help="random seed (data order, augmentation, init)")
    o.add_argument(
        "--compile",
        action="store_const",
        const=True,
        help="torch.compile the training forward (CUDA; each new input shape compiles once)",
    )
    o.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune"),
        help="with --compile: reduce-overhead replays the compiled forward and backward as CUDA graphs (fastest "
        "on CUDA; one graph per input shape); default: default (no CUDA graphs)",
    )
    o.add_argument(
        "--activation-memory-budget",
        type=float,
        metavar="X",
        help="with --compile: share of activations kept for the backward, 0-1 (e.g. 0.5: the cheapest are "
        "recomputed; less memory at little cost); default: torch's (1.0, keep all)",
    )
    o.add_argument(
        "--compile-criterion",
        action="store_const",
        const=True,
        help="torch.compile the loss pass after matching (fuses its several hundred small GPU launches; one "
        "graph for every batch; experimental: ran on an H100 for seg-medium in bf16, while Triton crashed on a small "
        "float32 case; a failure to compile is a clear error at the first step)",
    )
    o.add_argument(
        "--grad-checkpointing",
        action="store_const",
        const=True,
        help="recompute the backbone's activations in the backward pass: less memory, about one more forward",
    )
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
        "--per-class",
        choices=("every", "last", "never"),
        help="when to print the per-class tables (the per_class_*.csv files are written at every validation)",
    )
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
    r.add_argument(
        "--name",
        metavar="NAME",
        help="run name (default train, train2, ...: the first free one); a named folder that is not empty "
        "is refused, never overwritten",
    )
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
    show_defaults(t)

    va = sub.add_parser("val", help="validate weights on a dataset split", description="Validate a model.")
    va.add_argument(
        "--weights",
        required=True,
        metavar="PATH",
        help="weights to validate (.safetensors/.pth/.pt/.ckpt) or an exported model (.onnx, .engine, .pt2: needs "
        "rfdetr-export)",
    )
    _add_data_flags(va)
    va.add_argument("--split", choices=("val", "test"), default="val", help="dataset split to score")
    va.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass (default: 8)")
    va.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1")
    va.add_argument("--workers", type=int, metavar="N", help="data-loader worker processes (default: 0)")
    va.add_argument("--eval-max-dets", type=int, metavar="N", help="max detections per image")
    va.add_argument("--output", metavar="DIR", help="where to write the reports")
    va.add_argument(
        "--allow-class-mismatch",
        action="store_true",
        help="score the model even if its classes are not the dataset's categories (refused otherwise)",
    )
    _add_common(va)
    show_defaults(va, {"device": DERIVED_DEFAULTS["device"], "output": "runs/val, runs/val2, ..."})

    c = sub.add_parser("check", help="check a dataset and print a report", description="Check a dataset.")
    c.add_argument("path", nargs="?", metavar="PATH", help="dataset (any supported layout); same as --data")
    _add_data_flags(c)
    c.add_argument("--json", metavar="OUT.json", help="also write the report as JSON")
    _add_common(c)
    show_defaults(c)

    e = sub.add_parser("eval", help="COCO metrics of a results file", description="Evaluate COCO results.")
    e.add_argument("--gt", required=True, metavar="GT.json", help="COCO ground-truth annotations")
    e.add_argument("--pred", required=True, metavar="RESULTS.json", help="COCO results (list of detections)")
    e.add_argument(
        "--iou-type", choices=("bbox", "segm", "both"), default="both", help="which metrics to compute"
    )
    e.add_argument("--json", metavar="OUT.json", help="write the nested metrics JSON here")
    e.add_argument("--max-dets", type=int, default=100, metavar="N", help="max detections per image")
    e.add_argument("--no-boundary", action="store_true", help="skip Boundary AP")
    _add_common(e)
    show_defaults(e)

    pr = sub.add_parser(
        "predict",
        help="detect and segment objects in images",
        description="Detect and segment objects in image files: write drawn images and COCO results.",
    )
    pr.add_argument("weights", metavar="WEIGHTS", help="weights file (ours or upstream) or an official name")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    pr.add_argument(
        "--threshold", type=score, default=0.5, metavar="S", help="keep detections scoring above this"
    )
    pr.add_argument("--out", default="predictions", metavar="DIR", help="where drawn images and JSON go")
    pr.add_argument("--json", action="store_true", help="also write DIR/predictions.json (COCO results)")
    pr.add_argument("--no-draw", action="store_true", help="do not write drawn images")
    pr.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass")
    pr.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1")
    _add_common(pr)
    show_defaults(pr)

    st = sub.add_parser(
        "strip",
        help="write an inference-only copy of a weights file (smaller)",
        description="Keep DETR group 0 only (all that inference runs); the model card and record are kept.",
    )
    st.add_argument("input", metavar="IN", help="weights file written by rfdetr (last/best.safetensors)")
    st.add_argument("output", metavar="OUT", help="where to write the stripped .safetensors")
    _add_common(st)
    return parser


class _Parser(argparse.ArgumentParser):
    """No flag abbreviations (``--epoch`` is an error, not ``--epochs``), and an unknown flag is answered
    with the closest known ones and this (sub)command's usage."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        unknown = [a for a in extras if a.startswith("-")]
        if unknown and self.prog.count(" ") >= 1:  # a subcommand's parser: say it here, with its usage
            flag = unknown[0].split("=", 1)[0]
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; see `{self.prog} -h`"
            self.error(f"unrecognized option {flag}{hint}")
        return ns, extras


def _misplaced_path(token: str) -> str | None:
    """The message for a first word that is neither a subcommand nor a flag (e.g. a dataset path)."""
    close = difflib.get_close_matches(token, SUBCOMMANDS, n=1, cutoff=0.6)
    if close:
        return f"unknown subcommand {token!r}; did you mean `{PROG} {close[0]}`?"
    return (
        f"{token!r} is not a subcommand ({', '.join(SUBCOMMANDS)}); to train on a dataset there, "
        f"did you mean `{PROG} --data {token}`?"
    )


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
    raw = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if raw and not raw[0].startswith("-") and raw[0] not in SUBCOMMANDS:
        parser.error(_misplaced_path(raw[0]))
    args = parser.parse_args(normalize_argv(raw))
    if args.command == "check" and args.path and args.data and args.path != args.data:
        parser.error(f"check got two datasets: {args.path} and --data {args.data}; give one")
    if args.command == "check":
        args.path = args.path or args.data
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
