"""The real server on an exported seg-tiny ``.onnx`` (ONNX Runtime behind the same ``predict``), and with
``--workers 2`` (uvicorn worker processes importing the app factory by name)."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_support import RES, ServerProcess, encode, image_array
from test_server import assert_matches

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "onnx.jpg"
    path.write_bytes(encode(image_array(150, 220, seed=1), "JPEG", quality=90))
    return path


@pytest.fixture(scope="module")
def onnx_file(checkpoint, tmp_path_factory):
    """The session's seg-tiny checkpoint exported by rfdetr-export's CLI (dynamic batch, no check)."""
    pytest.importorskip("onnxruntime")
    from rfdetr_export.cli import main

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert main([str(checkpoint), "--onnx", "--dynamic-batch", "--no-check", "--output", str(path)]) == 0
    return path


def test_onnx_model_served_equals_its_predict_and_card_says_backend(onnx_file, image, tmp_path):
    from rfdetr_core import RFDETR

    want = RFDETR.from_file(onnx_file).predict(str(image), threshold=0.5)
    assert len(want) > 0
    server = ServerProcess([str(onnx_file), "--max-batch", "4"], tmp_path / "onnx.log").wait_ready()
    try:
        card = httpx.get(server.url + "/model").json()
        r = httpx.post(server.url + "/predict", files={"file": ("a.jpg", image.read_bytes(), "image/jpeg")},
                       timeout=60)
    finally:
        server.stop()
    assert card["backend"] == "onnxruntime" and card["variant"] == "seg-tiny"
    assert card["resolution"] == list(RES) and card["card"]["resolution"] == list(RES)
    assert [c["name"] for c in card["classes"]] == ["ten", "twenty", "thirty"]
    assert {"onnxruntime", "rfdetr_export", "rfdetr_core", "rfdetr_serve"} <= set(card["versions"])
    assert card["limits"]["max_pixels"] > 0 and card["batching"]["max_batch"] == 4
    assert r.status_code == 200, r.text
    assert_matches(r.json(), want)


def test_two_workers_start_and_answer(checkpoint, local_model, image, tmp_path):
    server = ServerProcess([str(checkpoint), "--workers", "2"], tmp_path / "workers.log").wait_ready()
    try:
        deadline_tries = 120
        pids: set[int] = set()
        while len(pids) < 2 and deadline_tries:  # /readyz answers once one worker is ready; wait for both
            pids = {json.loads(line)["pid"] for line in server.log().splitlines()
                    if line.startswith("{") and '"event": "ready"' in line}
            deadline_tries -= 1
            if len(pids) < 2:
                import time

                time.sleep(0.5)
        answers = [httpx.post(server.url + "/predict", content=image.read_bytes(), timeout=60) for _ in range(4)]
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        code = server.stop()
    assert len(pids) == 2, server.log()
    want = local_model.predict(str(image), threshold=0.5)
    for r in answers:
        assert r.status_code == 200, r.text
        assert_matches(r.json(), want)
    assert "rfdetr_serve_requests" in metrics
    assert code == 0
