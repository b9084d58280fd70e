"""Load test of rfdetr-serve on loopback: requests/s, latency percentiles and errors under concurrent clients.

Three servers, the same model and the same image, loaded one after the other (``--rounds`` repeats the
sequence, so drifts in the machine's load hit all three alike):

* ``batched``   our server with dynamic batching (``--max-batch B --max-wait-ms W``),
* ``batch1``    our server with ``--max-batch 1`` (one image per model call),
* ``litserve``  the same model behind LitServe (``max_batch_size=B``, ``batch_timeout=W``), doing the same
  work: the upload decoded once by the same ``RFDETR.predict`` (same preprocessing, same threshold), the
  same JSON with the same COCO RLE masks (``rfdetr_serve.responses.detections_json``).

Only the server being measured runs: each is started, loaded, then stopped before the next starts. (An idle
LitServe server is not idle: its inference worker polls its queue every millisecond, 14 % of a core
measured on the 2-core VM, which slowed the other servers when all three were kept up.)

Each client posts the image (multipart ``file``) in a loop; answers arriving during ``--seconds`` after a
warm-up (``--warmup``, not counted) give requests/s and latencies; a request fails when it gets no 200 or no
parseable JSON. Only loopback addresses are used.

LitServe is not part of the workspace (nor of uv.lock); install it for the benchmark only, into a folder of
its own, without its dependencies (fastapi and uvicorn are the workspace's, so both servers run the same
HTTP stack), and put that folder on ``PYTHONPATH``::

    uv pip install --python .venv/bin/python --target /tmp/serve-bench-site --no-deps litserve==0.2.19 pyzmq
    PYTHONPATH=/tmp/serve-bench-site .venv/bin/python benchmarks/serve_load.py --clients 32 --seconds 20 \
        --rounds 3 --json benchmarks/results/serve_load.json

The model is ``seg-nano`` with random weights (a class bias makes the image give ~``--detections`` detections
so masks are encoded), saved as a checkpoint; ``--onnx`` exports that checkpoint with ``rfdetr-export --onnx
--dynamic-batch`` and serves the ``.onnx`` (ONNX Runtime) on all three servers; ``--model PATH`` serves another
file. Every server loads the file through ``RFDETR.from_file``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_image(h: int = 480, w: int = 640) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_model(folder: Path) -> Path:
    """seg-nano, random weights, as our checkpoint."""
    import torch

    from rfdetr_core import create_model, get_variant
    from rfdetr_core.checkpoint import save_checkpoint
    from rfdetr_core.factory import default_class_map
    from rfdetr_core.preprocess import PreprocessConfig

    torch.manual_seed(0)
    model = create_model("seg-nano")
    v = get_variant("seg-nano")
    meta = {"variant": v.name, "resolution": [v.resolution, v.resolution],
            "class_map": default_class_map(model.num_slots, v).to_json(), "preprocess": PreprocessConfig().to_json()}
    return save_checkpoint(folder / "seg-nano-random.safetensors", model.state_dict(), meta)


def export_onnx(checkpoint: Path, folder: Path) -> Path:
    """``checkpoint`` as a dynamic-batch ONNX file (rfdetr-export's CLI).

    Its check against PyTorch runs and is printed, but does not stop the load test: random weights' masks are
    noise around logit 0, so on a machine whose float order differs from PyTorch's (16-thread ONNX Runtime on
    an AVX-512 Xeon, 2026-12-04) one mask of a batch fell to IoU 0.97 against the check's 0.99 while scores
    agreed within 7e-5; the served answers come from the file alone either way.
    """
    out = folder / (checkpoint.stem + ".onnx")
    done = subprocess.run([sys.executable, "-m", "rfdetr_export", str(checkpoint), "--onnx", "--dynamic-batch",
                           "--output", str(out)])
    if not out.is_file():
        raise SystemExit(f"the export failed (exit status {done.returncode}); see its output above")
    if done.returncode != 0:
        print("note: the export's check against PyTorch failed (above); serving the file anyway", flush=True)
    return out


def pick_threshold(model_path: Path, image: bytes, detections: int) -> float:
    """The score threshold at which the bench image gives ``detections`` detections."""
    from rfdetr_core import RFDETR

    det = RFDETR.from_file(model_path, device="cpu").predict(io.BytesIO(image), threshold=0.0)
    scores = np.sort(det.scores)[::-1]
    return float(scores[min(detections, len(scores) - 1)])


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def start_server(kind: str, model: Path, max_batch: int, wait_ms: float, threshold: float, log: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if kind == "litserve":
        cmd = [sys.executable, str(HERE), "_litserve", str(model), str(port), str(max_batch), str(wait_ms),
               str(threshold)]
        ready_path = "/health"
    else:
        batch = 1 if kind == "batch1" else max_batch
        cmd = [sys.executable, "-m", "rfdetr_serve", str(model), "--port", str(port), "--device", "cpu",
               "--max-batch", str(batch), "--max-wait-ms", str(wait_ms), "--threshold", str(threshold),
               "--max-queue", "1024", "--log-level", "warning"]
        ready_path = "/readyz"
    out = open(log, "wb")  # noqa: SIM115 - closed by stop_server
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc._log_file = out  # type: ignore[attr-defined]
    wait_ready(url, proc, ready_path)
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (LitServe runs worker processes in it), then SIGKILL to
    whatever of the group is left once the server itself has exited or after 60 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
    with contextlib.suppress(ProcessLookupError):  # ProcessLookupError: the whole group is gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc._log_file.close()  # type: ignore[attr-defined]


async def run_load(url: str, image: bytes, clients: int, seconds: float, warmup: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    batch_sizes: list[int] = []
    last_error = [None]
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds

    async def client(c: httpx.AsyncClient):
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            r = None
            try:
                r = await c.post("/predict", files={"file": ("bench.jpg", image, "image/jpeg")})
                ok = r.status_code == 200
                body = r.json() if ok else None
                ok = ok and "detections" in body
            except (httpx.HTTPError, ValueError) as exc:
                ok, body = False, None
                last_error[0] = repr(exc)
            t1 = time.perf_counter()
            # closed loop: every answer that arrives inside the window counts (throughput = answers per
            # second in steady state); the warm-up lets the queue fill first. Requests still open at the end
            # are awaited but not counted, so the next server starts on an idle machine.
            if t_start <= t1 <= t_end:
                if ok:
                    latencies.append(t1 - t0)
                    if "batch_size" in body:
                        batch_sizes.append(body["batch_size"])
                else:
                    errors += 1
                    if body is None and r is not None and last_error[0] is None:
                        last_error[0] = f"HTTP {r.status_code}: {r.text[:200]}"

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    lat = np.asarray(latencies) * 1e3
    return {
        "requests": len(latencies), "errors": errors, "rps": len(latencies) / seconds,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p90_ms": float(np.percentile(lat, 90)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "mean_batch": float(np.mean(batch_sizes)) if batch_sizes else None,
        "last_error": last_error[0],
    }


try:  # the LitServe peer's API must be importable at module level: LitServe spawns its worker processes
    import litserve as _ls
except ImportError:  # only the third server needs it
    _ls = None

if _ls is not None:

    class SegAPI(_ls.LitAPI):
        """The LitServe peer: same model, same predict, same JSON as our server."""

        def __init__(self, model: str, threshold: float, **kwargs):
            super().__init__(**kwargs)
            self.model_path, self.threshold = model, threshold

        def setup(self, device):
            from rfdetr_core import RFDETR

            self.model = RFDETR.from_file(self.model_path, device="cpu")

        def decode_request(self, request):
            return request["file"].file.read()

        def predict(self, batch):
            images = batch if isinstance(batch, list) else [batch]
            dets = self.model.predict([io.BytesIO(b) for b in images], threshold=self.threshold,
                                      batch_size=len(images))
            return dets if isinstance(batch, list) else dets[0]

        def encode_response(self, det):
            from rfdetr_serve.responses import MaskFormat, detections_json, select

            h, w = det.image_size
            return {"image": {"width": w, "height": h}, "model": "seg-nano",
                    "detections": detections_json(det, select(det, self.threshold, None, None), MaskFormat.rle)}


def litserve_main(model: str, port: str, max_batch: str, wait_ms: str, threshold: str) -> None:
    if _ls is None:
        raise SystemExit("litserve is not installed: see the install command in benchmarks/serve_load.py's docstring")
    api = SegAPI(model, float(threshold), max_batch_size=int(max_batch), batch_timeout=float(wait_ms) / 1000.0)
    server = _ls.LitServer(api, accelerator="cpu", timeout=120)
    server.run(host="127.0.0.1", port=int(port), num_api_servers=1, generate_client_file=False,
               log_level="warning")


def versions() -> dict:
    import fastapi
    import torch
    import uvicorn

    import rfdetr_core
    import rfdetr_serve

    out = {"python": platform.python_version(), "torch": torch.__version__, "fastapi": fastapi.__version__,
           "uvicorn": uvicorn.__version__, "rfdetr_core": rfdetr_core.__version__,
           "rfdetr_serve": rfdetr_serve.__version__}
    out["litserve"] = _ls.__version__ if _ls is not None else None
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before counting")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--detections", type=int, default=10, help="detections per image (sets the threshold)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--servers", default="batched,batch1,litserve")
    p.add_argument("--model", type=Path, default=None, help="serve this file instead of random seg-nano")
    p.add_argument("--onnx", action="store_true", help="serve random seg-nano exported to ONNX (dynamic batch)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    image = bench_image()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp_path = Path(tmp)
        model = args.model or make_model(tmp_path)
        if args.onnx:
            model = export_onnx(model, tmp_path)
        threshold = pick_threshold(model, image, args.detections)
        print(f"model {model.name}, image 640x480 JPEG ({len(image)} bytes), threshold {threshold:.4f} "
              f"(~{args.detections} detections), {args.clients} clients x {args.seconds:g} s, "
              f"max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms", flush=True)
        load_before = os.getloadavg()
        results: dict[str, list[dict]] = {}
        kinds = args.servers.split(",")
        # one server at a time: started, loaded, stopped (see the module docstring)
        for rnd in range(args.rounds):
            for kind in kinds:
                proc, url = start_server(kind, model, args.max_batch, args.max_wait_ms, threshold,
                                         tmp_path / f"{kind}.log")
                try:
                    stats = asyncio.run(run_load(url, image, args.clients, args.seconds, args.warmup))
                finally:
                    stop_server(proc)
                stats["loadavg_1m_after"] = os.getloadavg()[0]
                results.setdefault(kind, []).append(stats)
                ms = {k: "-" if stats[k] is None else f"{stats[k]:.0f}" for k in ("p50_ms", "p90_ms", "p99_ms")}
                print(f"round {rnd} {kind:9s} {stats['rps']:6.2f} req/s  p50 {ms['p50_ms']} ms  p90 "
                      f"{ms['p90_ms']} ms  p99 {ms['p99_ms']} ms  errors {stats['errors']}  mean batch "
                      f"{stats['mean_batch']}  load {stats['loadavg_1m_after']:.1f}", flush=True)
    summary = {k: float(np.mean([s["rps"] for s in v])) for k, v in results.items()}
    ratios = {}
    if summary.get("batched") and summary.get("batch1"):
        ratios["batched/batch1"] = summary["batched"] / summary["batch1"]
    if summary.get("batched") and summary.get("litserve"):
        ratios["batched/litserve"] = summary["batched"] / summary["litserve"]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    report = {
        "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_before": load_before},
        "versions": versions(), "threshold": threshold, "settings": vars(args) | {"model": str(args.model)},
        "results": results, "mean_rps": summary, "ratios": ratios,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_litserve":
        litserve_main(*sys.argv[2:7])
    else:
        sys.exit(main())
