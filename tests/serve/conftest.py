"""Fixtures of the server tests: the checkpoint, the main server (started once per session) and the same
model loaded in-process as the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_support import API_KEY, ServerProcess, make_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve_model") / "tiny.safetensors")


@pytest.fixture(scope="session")
def server(checkpoint, tmp_path_factory):
    """The main server: API key, 1 MiB uploads, 1.5 Mpx images, batches of up to 8 within 20 ms."""
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    proc = ServerProcess(
        [str(checkpoint), "--api-key", API_KEY, "--max-upload-mb", "1", "--max-pixels", "1500000",
         "--max-batch", "8", "--max-wait-ms", "20", "--max-queue", "256"],
        log,
    )
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def local_model(checkpoint):
    """The same checkpoint through the Python API: the reference for every answer."""
    from rfdetr_core import RFDETR

    return RFDETR.from_checkpoint(checkpoint, device="cpu")

