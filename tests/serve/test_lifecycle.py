"""Server life cycle: a full queue answers 503 with Retry-After, SIGTERM lets the request in flight finish
before the process exits, and a model that cannot load ends the command with its message."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_support import ServerProcess, encode, image_array

pytestmark = pytest.mark.timeout(300)


def test_full_queue_503_then_sigterm_drains(checkpoint, tmp_path):
    # one image waits up to 4 s for a second one to fill the batch, and only one may wait: the second request
    # finds the queue full; SIGTERM during the first one's wait must still let it answer
    server = ServerProcess([str(checkpoint), "--max-batch", "2", "--max-wait-ms", "4000", "--max-queue", "1"],
                           tmp_path / "server.log").wait_ready()
    data = encode(image_array(60, 80, seed=3), "PNG")
    first: dict = {}

    def send_first():
        first["response"] = httpx.post(server.url + "/predict", content=data, timeout=60)

    try:
        t = threading.Thread(target=send_first)
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the first request is in flight (this scrape counts itself too)
            text = httpx.get(server.url + "/metrics").text
            if "rfdetr_serve_in_flight_requests 2.0" in text:
                break
            time.sleep(0.05)
        time.sleep(0.5)  # its decode (milliseconds) is done: it waits in the queue for a batch-mate
        busy = httpx.post(server.url + "/predict", content=data, timeout=60)
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"] == "1" and "--max-queue 1" in busy.json()["detail"]
        assert "response" not in first  # still waiting for its batch
        server.proc.send_signal(15)  # SIGTERM
        t.join(60)
        assert first["response"].status_code == 200, first["response"].text
        assert first["response"].json()["batch_size"] == 1
        assert server.proc.wait(60) == 0
    finally:
        rc = server.stop()
    log = server.log()
    assert '"status": 503' in log and '"status": 200' in log, log
    assert rc == 0


def test_model_that_cannot_load_ends_the_command(tmp_path):
    missing = tmp_path / "nothing-here.safetensors"
    proc = subprocess.run([sys.executable, "-m", "rfdetr_serve", str(missing), "--port", "0", "--device", "cpu"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rfdetr-serve: cannot serve") and "nothing-here.safetensors" in last
    assert "Traceback" not in proc.stderr


def test_fast_path_on_the_cpu_ends_the_command_with_what_to_do(checkpoint):
    proc = subprocess.run([sys.executable, "-m", "rfdetr_serve", str(checkpoint), "--port", "0", "--device", "cpu",
                           "--optimize", "graphs"], capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rfdetr-serve: cannot serve") and "--optimize graphs needs a PyTorch model on a CUDA" in last
    assert "--optimize off" in last and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["--threshold", "1.5"], "--threshold must be in [0, 1], got 1.5"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--api-key", ""], "The API key is empty"),
])
def test_bad_flags_exit_2_with_message(flags, message, capsys):
    from rfdetr_serve.cli import main

    assert main(["x.safetensors", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rfdetr-serve: " + message) and "\n" not in err


def test_openmp_threads_sleep_unless_the_user_chose(tmp_path):
    from rfdetr_serve.cli import default_thread_env

    env: dict[str, str] = {}
    default_thread_env(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    default_thread_env(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    # the command sets it before torch loads (libgomp reads it once, when it is loaded)
    probe = "import sys, rfdetr_serve.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
