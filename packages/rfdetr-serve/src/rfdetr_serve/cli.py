"""``rfdetr-serve MODEL``: serve a model over HTTP (``POST /predict``) with uvicorn.

::

    rfdetr-serve seg-nano                                  # official weights, http://127.0.0.1:8000
    rfdetr-serve runs/train/checkpoints/best.safetensors --host 0.0.0.0 --port 8080 --api-key "$KEY"
    rfdetr-serve model.onnx --workers 2 --max-batch 8 --max-wait-ms 5
    rfdetr-serve seg-medium --device cuda --optimize compile   # the compiled GPU fast path

It binds to 127.0.0.1 unless ``--host`` says otherwise. ``--workers N`` runs N processes (each loads the
model; torch threads are split between them). SIGTERM (or Ctrl-C) drains the requests in flight, then exits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence

from rfdetr_serve.limits import Limits
from rfdetr_serve.settings import API_KEY_ENV, OPTIMIZE_MODES, SETTINGS_ENV, ServeSettings

# Seconds uvicorn waits for in-flight requests after SIGTERM before closing them.
GRACEFUL_SHUTDOWN_S = 30


def default_thread_env(environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Let torch's OpenMP threads sleep instead of spin between parallel regions (``OMP_WAIT_POLICY=PASSIVE``)
    unless the user chose a policy. Must run before torch is imported (libgomp reads it when it loads).

    Why: a server shares its cores with the event loop, the decode/encode pool, other workers and other
    processes. On the shared 2-core VM, perf showed 46 % of the server's CPU in libgomp's spin-wait under load,
    and in-process seg-nano predict (batch 4, 2 threads) went from 1.67-1.70 to 0.82-0.91 CPU-s per image
    (2.8-3.4 -> 1.5-1.7 s wall) with the passive policy (load average 4-6).
    """
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build_parser() -> argparse.ArgumentParser:
    d = ServeSettings(model="-")
    p = argparse.ArgumentParser(
        prog="rfdetr-serve",
        description="Serve an RF-DETR-Seg model over HTTP (POST /predict; docs at /docs, a demo page at /).",
    )
    p.add_argument("model", metavar="MODEL",
                   help="an exported .onnx/.engine/.pt2 file, a checkpoint (ours or upstream's) or an official name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    p.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    p.add_argument(
        "--optimize", choices=OPTIMIZE_MODES, default=d.optimize,
        help="GPU fast path of a PyTorch model on CUDA (bf16 network, float32 selection, CUDA graphs): auto "
             "(default: graphs on CUDA, nothing on the CPU), graphs (ready in seconds), compile (torch.compile "
             "first: faster, about a minute to start), max-autotune (compile with autotuned matrix multiplies: "
             "minutes to start), off (eager float32)",
    )
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"images per model call (default {d.max_batch})")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help=f"longest wait for a batch to fill (default {d.max_wait_ms:g} ms)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"images waiting before new requests get 503 (default {d.max_queue})")
    p.add_argument("--api-key", default=None,
                   help=f"require this key (Authorization: Bearer KEY or X-API-Key); default ${API_KEY_ENV}")
    p.add_argument("--max-upload-mb", type=float, default=d.limits.max_upload_bytes / 2**20,
                   help=f"request body limit (default {d.limits.max_upload_bytes / 2**20:g} MiB)")
    p.add_argument("--max-pixels", type=int, default=d.limits.max_pixels,
                   help=f"width x height limit of an image (default {d.limits.max_pixels})")
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help=f"default score threshold (default {d.threshold})")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="debug also logs tracebacks")
    return p


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels)
    return ServeSettings(
        model=args.model, device=args.device, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, threshold=args.threshold, api_key=api_key, limits=limits,
        log_level=args.log_level, optimize=args.optimize,
    )


def main(argv: Sequence[str] | None = None) -> int:
    default_thread_env()
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    except ValueError as exc:
        print(f"rfdetr-serve: {exc}", file=sys.stderr)
        return 2
    return serve(settings, args.host, args.port, args.workers, args.log_level)


def serve(settings: ServeSettings, host: str, port: int, workers: int, log_level: str) -> int:
    import uvicorn

    os.environ[SETTINGS_ENV] = settings.to_env()
    config = dict(host=host, port=port, log_level=log_level, access_log=False,
                  timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    if workers > 1:
        # each worker is its own process: split the cores, and let /metrics add the processes up
        os.environ.setdefault("RFDETR_SERVE_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        made_dir = None
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            made_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="rfdetr-serve-metrics-")
        try:
            uvicorn.run("rfdetr_serve.app:app_from_env", factory=True, workers=workers, **config)
        finally:
            if made_dir:
                shutil.rmtree(made_dir, ignore_errors=True)
        return 0
    from rfdetr_serve.app import create_app

    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, **config))
    # a model that fails to load stops the server the same way SIGTERM does (drain, then exit)
    app.state.rfdetr.on_fatal = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal it handled once it has drained; this makes that a normal exit (status 0)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    error = app.state.rfdetr.load_error
    if error:
        print(f"rfdetr-serve: cannot serve {settings.model!r}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
