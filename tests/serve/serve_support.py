"""Helpers of the server tests: the seg-tiny test checkpoint, test images, and the real server
(``python -m rfdetr_serve`` under uvicorn in a subprocess on a free loopback port)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rfdetr_core import create_model
from rfdetr_core.checkpoint import save_checkpoint
from rfdetr_core.class_map import ClassEntry, ClassMap
from rfdetr_core.preprocess import PreprocessConfig

VARIANT = "seg-tiny"
RES = (64, 96)  # a small valid input (multiples of 16): fast on 2 cores
# the model has 4 slots; slot 3 maps to no class, so predict drops it (the server must too)
CLASS_MAP = ClassMap([ClassEntry(0, 10, "ten"), ClassEntry(1, 20, "twenty"), ClassEntry(2, 30, "thirty")], 4)
API_KEY = "test-key-8f3a"


def make_checkpoint(path: Path) -> Path:
    """seg-tiny with random weights whose class biases give a few detections above 0.5 per image."""
    torch.manual_seed(0)
    model = create_model(VARIANT)
    with torch.no_grad():
        model.class_embed.bias.copy_(torch.tensor([0.3, 0.6, -0.2, 1.0]))
    meta = {"variant": VARIANT, "resolution": list(RES), "class_map": CLASS_MAP.to_json(),
            "preprocess": PreprocessConfig().to_json()}
    return save_checkpoint(path, model.state_dict(), meta)


def image_array(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth random colours (JPEG-friendly) ``[h, w, 3]`` uint8."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def encode(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``rfdetr-serve`` in a subprocess; ``url`` once ready; the log in ``log_path``."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "rfdetr_serve", *args, "--port", str(self.port), "--device", "cpu"]
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("OMP_NUM_THREADS", "2")
        self._log = open(log_path, "wb")  # noqa: SIM115 - the server writes to it until stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


AUTH = {"Authorization": f"Bearer {API_KEY}"}
