"""``rfdetr-export``: export a model to ONNX, a TensorRT engine or an AOTInductor package, check it, or benchmark.

::

    rfdetr-export MODEL [--onnx] [--output F] [--dynamic-batch] [--batch N] [--half | --int8] [--raw] [--num-select K]
                  [--opset 17] [--simplify] [--deform-attn gather|gridsample|trt-plugin]
                  [--check-images DIR] [--no-check]
    rfdetr-export MODEL --trt [--min-batch 1 --opt-batch 1 --max-batch 1] [--half] [--workspace-gb G]
    rfdetr-export MODEL --aoti [--output F] [--dynamic-batch] [--batch N] [--device cpu|cuda] [--num-select K]
    rfdetr-export benchmark MODEL --backend torch|compile|onnxruntime|tensorrt|aoti [--batch-size N] ...

MODEL is our checkpoint, an upstream ``.pth``/``.pt``/``.ckpt`` file or an official name (``seg-nano``).
After every export the file is run against PyTorch on the same images (:mod:`rfdetr_export.check`); the
command exits 1 when they disagree beyond the tolerances, 2 on bad input (one line, no traceback unless
``--debug``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rfdetr_core.errors import RFDETRError, first_line

EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rfdetr-export",
        description="Export an RF-DETR-Seg model to ONNX or TensorRT and check it against PyTorch. "
        "'rfdetr-export benchmark -h' for the benchmark.",
    )
    p.add_argument(
        "model", metavar="MODEL", help="checkpoint file (ours or upstream) or official name (seg-nano)"
    )
    p.add_argument("--variant", help="variant of an upstream file that does not say (e.g. seg-medium)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--onnx", action="store_true", help="export ONNX (default)")
    fmt.add_argument(
        "--trt", action="store_true", help="build a TensorRT engine (needs the trt extra and a GPU)"
    )
    fmt.add_argument(
        "--aoti",
        action="store_true",
        help="compile an AOTInductor package (.pt2: loads in seconds, no tracing; runs on --device only)",
    )
    p.add_argument(
        "--output", metavar="PATH", help="output file (default: <model stem>.onnx / .engine / .pt2 here)"
    )
    p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch axis (ONNX, --aoti)")
    p.add_argument(
        "--device", default="cpu", help="--aoti: device the package is compiled for, cpu or cuda (default cpu)"
    )
    p.add_argument("--batch", type=int, default=1, help="batch size of a static graph (default 1)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--half", action="store_true", help="fp16 graph, float32 inputs/outputs")
    precision.add_argument(
        "--int8",
        action="store_true",
        help="int8 weights for the linear layers, activations quantized at run time (ONNX Runtime on CPUs; "
        "float32 inputs/outputs; not for --trt)",
    )
    p.add_argument(
        "--raw", action="store_true", help="outputs pred_logits/pred_boxes/pred_masks (no post-processing)"
    )
    p.add_argument(
        "--num-select", type=int, help="detections K per image in the graph (default: the model's)"
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset: 17 (default) or 18")
    p.add_argument("--simplify", action="store_true", help="onnxslim pass (extra simplify)")
    p.add_argument(
        "--deform-attn",
        choices=("gather", "gridsample", "trt-plugin"),
        default=None,
        help="deformable-attention sampler in the graph (default gather; gridsample is refused for --trt)",
    )
    p.add_argument(
        "--check-images", metavar="DIR", help="images for the check (default: built-in synthetic ones)"
    )
    p.add_argument("--no-check", action="store_true", help="skip the check against PyTorch")
    trt = p.add_argument_group("TensorRT")
    trt.add_argument("--min-batch", type=int, default=1)
    trt.add_argument("--opt-batch", type=int, default=None, help="default: --min-batch")
    trt.add_argument("--max-batch", type=int, default=None, help="default: --opt-batch")
    trt.add_argument(
        "--workspace-gb", type=float, default=None, help="builder workspace limit (default: TensorRT's)"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _default_output(model: str, suffix: str, half: bool, raw: bool, int8: bool = False) -> Path:
    stem = Path(model).stem if Path(model).suffix else Path(model).name
    return Path(f"{stem}{'_fp16' if half else ''}{'_int8' if int8 else ''}{'_raw' if raw else ''}{suffix}")


def _shape_text(names: Sequence[str], card, k: int, batch: str) -> str:
    h, w = card.mask_size or (0, 0)
    shapes = {
        "scores": f"[{batch},{k}] f32",
        "labels": f"[{batch},{k}] int64",
        "boxes": f"[{batch},{k},4] f32",
        "masks": f"[{batch},{k},{h},{w}] f32",
        "pred_logits": f"[{batch},{card.num_queries},{card.num_slots}] f32",
        "pred_boxes": f"[{batch},{card.num_queries},4] f32",
        "pred_masks": f"[{batch},{card.num_queries},{h},{w}] f32",
    }
    return ", ".join(f"{n} {shapes.get(n, '')}".strip() for n in names)


def _load(args):
    from rfdetr_core.factory import load_model

    return load_model(args.variant, None, args.model)


def _print_check(results) -> bool:
    for r in results:
        print("  " + r.line())
    return all(r.ok for r in results)


def _check_against_pytorch(exported, reference, card, batches, args, path) -> int:
    """Run the post-export check of ``exported`` against ``reference`` (PyTorch) on ``batches``; the exit
    code: 0, or :data:`EXIT_CHECK_FAILED` with a message naming ``path``."""
    from rfdetr_export.check import failure_hint, run_check

    results = run_check(
        exported,
        reference,
        resolution=card.resolution,
        preprocess_config=card.preprocess,
        batches=batches,
        precision=_precision(args),
        images_dir=args.check_images,
    )
    if _print_check(results):
        return 0
    print(f"rfdetr-export: {path} disagrees with PyTorch beyond the tolerances (see above).", file=sys.stderr)
    hint = failure_hint(results)
    if hint:
        print(f"rfdetr-export: {hint}", file=sys.stderr)
    return EXIT_CHECK_FAILED


def _precision(args) -> str:
    """The check's tolerance key (:data:`rfdetr_export.check.TOLERANCES`)."""
    return "float16" if args.half else "int8" if args.int8 else "float32"


def run_onnx(args) -> int:
    from rfdetr_export.export_model import deploy_for, export_and_report

    loaded = _load(args)
    sampler = args.deform_attn or "gather"
    output = (
        Path(args.output) if args.output else _default_output(args.model, ".onnx", args.half, args.raw, args.int8)
    )
    module, deploy, card, names = deploy_for(loaded, raw=args.raw, num_select=args.num_select, half=args.half)
    result = export_and_report(
        module,
        card,
        names,
        output,
        batch=args.batch,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        half=args.half,
        sampler=sampler,
        simplify=args.simplify,
        int8=args.int8,
    )
    batch = "B" if args.dynamic_batch else str(args.batch)
    k = deploy.num_select
    print(f"rfdetr-export: {loaded.variant.name} from {args.model} -> {result.path}")
    print(f"  inputs: images [{batch},3,{card.resolution[0]},{card.resolution[1]}] f32 (normalised)")
    print(f"  outputs: {_shape_text(result.output_names, card, k, batch)}")
    precision = _precision(args)
    print(
        f"  opset {result.opset}, {precision}, deform-attn {sampler}, {'dynamic' if args.dynamic_batch else 'static'} batch"
    )
    if result.nodes_before_simplify is not None:
        print(f"  nodes: {result.nodes_before_simplify} before simplify -> {result.nodes} after")
    else:
        print(f"  nodes: {result.nodes}")
    print(f"  size: {result.size_bytes / 2**20:.1f} MiB")
    if result.fp16_share is not None:
        print(f"  fp16 nodes: {result.fp16_share:.1%} of compute nodes")
    if result.int8 is not None:
        q = result.int8
        print(
            f"  int8: {q.quantized} of {q.matmuls} MatMuls (those with a constant weight); weights "
            f"{q.float32_bytes / 2**20:.1f} -> {q.int8_bytes / 2**20:.1f} MiB; {q.gelus} GELUs and "
            f"{q.attentions} attentions fused"
        )
    if args.no_check:
        print("  check: skipped (--no-check)")
        return 0
    if sampler == "trt-plugin":
        print(
            "  check: skipped (ONNX Runtime has no kernel for MultiscaleDeformableAttnPlugin_TRT; --trt checks the engine)"
        )
        return 0
    from rfdetr_export.check import decoded_raw
    from rfdetr_export.runtime import OnnxRuntimeModel

    runner = OnnxRuntimeModel(result.path)
    exported, reference = runner, deploy
    if args.raw:  # compared after the same float32 graph-safe decode on both sides
        exported, reference = decoded_raw(runner.run, card), decoded_raw(deploy, card)
    batches = (1, 3) if args.dynamic_batch else (args.batch,)
    return _check_against_pytorch(exported, reference, card, batches, args, result.path)


def run_trt(args) -> int:
    from rfdetr_export.export_model import deploy_for, export_and_report
    from rfdetr_export.tensorrt_build import BatchProfile, build_engine, import_tensorrt

    if args.int8:
        raise RFDETRError(
            "--int8 is for ONNX Runtime (dynamic quantization); TensorRT int8 needs calibration, which "
            "rfdetr-export does not do. Use --trt --half, or --onnx --int8."
        )
    import_tensorrt()  # fail fast, naming the extra, before the slow ONNX export
    if args.deform_attn == "gridsample":
        raise RFDETRError(
            "--trt with --deform-attn gridsample is refused: TensorRT 10.13-11.1 miscompiles GridSample "
            "deformable attention (NVIDIA/TensorRT#4813). Use gather (default) or trt-plugin."
        )
    if args.raw:
        raise RFDETRError("--trt builds the post-processed graph only; drop --raw.")
    opt = args.opt_batch or args.min_batch
    profile = BatchProfile(args.min_batch, opt, args.max_batch or opt)
    sampler = args.deform_attn or "gather"
    loaded = _load(args)
    engine = Path(args.output) if args.output else _default_output(args.model, ".engine", args.half, False)
    module, deploy, card, names = deploy_for(loaded, raw=False, num_select=args.num_select, half=args.half)
    onnx_path = engine.with_suffix(".onnx")
    dynamic = profile.max_batch > profile.min_batch
    result = export_and_report(
        module,
        card,
        names,
        onnx_path,
        batch=profile.min_batch,
        dynamic_batch=dynamic,
        opset=args.opset,
        half=args.half,
        sampler=sampler,
        simplify=args.simplify,
        for_tensorrt=True,
    )
    print(f"rfdetr-export: {result.path} ({result.nodes} nodes, no GridSample); building {engine}")
    side = build_engine(
        result.path,
        engine,
        input_name="images",
        resolution=card.resolution,
        profile=profile,
        half=args.half,
        card_metadata=card.to_metadata(),
        workspace_gb=args.workspace_gb,
        plugins=sampler == "trt-plugin",
    )
    print(
        f"  engine: TensorRT {side['tensorrt']}, {side['gpu']}, {side['precision']} "
        f"({side['fp16_layer_share']:.1%} fp16 layers), batch {profile.min_batch}..{profile.max_batch}"
    )
    if args.no_check:
        print("  check: skipped (--no-check)")
        return 0
    import torch

    from rfdetr_export.runtime import TensorRTModel

    # a real TensorRT needs CUDA; the CPU device is taken only by the test double of tensorrt
    runner = TensorRTModel(engine, device="cuda" if torch.cuda.is_available() else "cpu")
    batches = sorted({profile.min_batch, min(3, profile.max_batch)} if dynamic else {profile.min_batch})
    return _check_against_pytorch(runner, deploy.to(runner.device), card, batches, args, engine)


def run_aoti(args) -> int:
    from rfdetr_export.aoti import AotiModel, export_aoti
    from rfdetr_export.export_model import deploy_for

    for flag, why in (
        ("half", "fp16 moves the two-stage proposals (README, Export); --aoti compiles float32"),
        ("int8", "int8 is ONNX Runtime's dynamic quantization"),
        ("raw", "the package ends in the post-processed outputs"),
        ("simplify", "--simplify is an ONNX pass"),
    ):
        if getattr(args, flag):
            raise RFDETRError(f"--aoti does not take --{flag}: {why}. Drop --{flag}.")
    output = Path(args.output) if args.output else _default_output(args.model, ".pt2", False, False)
    if output.suffix != ".pt2":
        raise RFDETRError(f"--output {output}: an AOTInductor package must end in .pt2 (e.g. {output.stem}.pt2).")
    loaded = _load(args)
    module, deploy, card, names = deploy_for(loaded, raw=False, num_select=args.num_select)
    sampler = args.deform_attn or "gather"
    print(f"rfdetr-export: compiling {loaded.variant.name} for {args.device} (AOTInductor; minutes on a small CPU)")
    result = export_aoti(
        module,
        output,
        resolution=card.resolution,
        card_metadata=card.to_metadata(),
        device=args.device,
        batch=args.batch,
        dynamic_batch=args.dynamic_batch,
        sampler=sampler,
    )
    batch = "B" if args.dynamic_batch else str(args.batch)
    print(f"rfdetr-export: {loaded.variant.name} from {args.model} -> {result.path}")
    print(f"  inputs: images [{batch},3,{card.resolution[0]},{card.resolution[1]}] f32 (normalised)")
    print(f"  outputs: {_shape_text(names, card, deploy.num_select, batch)}")
    print(
        f"  AOTInductor, {result.device}, float32, deform-attn {sampler}, "
        f"{'dynamic' if args.dynamic_batch else 'static'} batch; export {result.export_seconds:.1f} s, "
        f"compile {result.compile_seconds:.1f} s"
    )
    print(f"  size: {result.size_bytes / 2**20:.1f} MiB")
    if args.no_check:
        print("  check: skipped (--no-check)")
        return 0
    runner = AotiModel(result.path, device=args.device)
    batches = (1, 3) if args.dynamic_batch else (args.batch,)
    return _check_against_pytorch(runner, deploy.to(runner.device), card, batches, args, result.path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "benchmark":
        from rfdetr_export.benchmark import main as benchmark_main

        return benchmark_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.trt:
            return run_trt(args)
        return run_aoti(args) if args.aoti else run_onnx(args)
    except (RFDETRError, OSError) as exc:
        if args.debug:
            raise
        print(f"rfdetr-export: error: {first_line(exc) or type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
