"""The real server (uvicorn subprocess, seg-tiny on CPU): every endpoint, the response schema, answers equal to
``RFDETR.predict`` on the same image, every error status with its message, the API key, and 64 concurrent
requests (some corrupt) answered like sequential ones."""

from __future__ import annotations

import asyncio
import socket

import httpx
import numpy as np
import pytest
from pycocotools import mask as mask_api
from serve_support import API_KEY, AUTH, RES, encode, image_array

pytestmark = [
    pytest.mark.timeout(300),
    # pycocotools' decode under numpy 2 (its own code, not ours)
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]


def assert_matches(body: dict, det, *, exact: bool = True) -> None:
    """The JSON of one image against core's ``Detections`` of the same image."""
    h, w = det.image_size
    assert body["image"] == {"width": w, "height": h}
    got = body["detections"]
    assert len(got) == len(det), (len(got), len(det))
    if not got:
        return
    np.testing.assert_allclose([d["box"] for d in got], det.boxes, atol=1e-3 if exact else 0.05)
    np.testing.assert_allclose([d["score"] for d in got], det.scores, atol=1e-6 if exact else 1e-4)
    assert [d["category_id"] for d in got] == det.category_ids.tolist()
    assert [d["class_name"] for d in got] == det.class_names
    for d, want in zip(got, det.masks):
        rle = {"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}
        assert rle["size"] == [h, w]
        decoded = mask_api.decode(rle).astype(bool)  # [h, w]: the mask decodes to the image size
        assert decoded.shape == (h, w)
        if exact:
            assert np.array_equal(decoded, want)
        else:  # batch composition may move a boundary pixel by float rounding
            assert np.mean(decoded != want) < 1e-3


def post(server, data: bytes, params: dict | None = None, headers: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(server.url + "/predict", content=data, params=params or {},
                      headers={**AUTH, **(headers or {})}, timeout=60, **kw)


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "street.jpg"
    path.write_bytes(encode(image_array(150, 220, seed=1), "JPEG", quality=90))
    return path


def test_health_ready_docs_open_without_key(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert httpx.get(server.url + "/docs").status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/predict", "/predict/batch", "/healthz", "/readyz", "/model", "/metrics"} <= set(spec["paths"])
    ok = spec["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/Prediction")
    assert spec["components"]["schemas"]["Prediction"]["examples"][0]["detections"][0]["mask"]["counts"]
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_key_is_enforced(server, jpeg):
    data = jpeg.read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": API_KEY + "x"}, {"Authorization": API_KEY}):
        r = httpx.post(server.url + "/predict", content=data, headers=headers)
        assert r.status_code == 401, headers
        assert "API key" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/model").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/model", headers={"X-API-Key": API_KEY}).status_code == 200
    assert httpx.post(server.url + "/predict", content=data, headers={"X-API-Key": API_KEY}).status_code == 200


def test_model_card(server):
    card = httpx.get(server.url + "/model", headers=AUTH).json()
    assert card["variant"] == "seg-tiny" and card["resolution"] == list(RES)
    assert card["classes"] == [{"category_id": 10, "name": "ten"}, {"category_id": 20, "name": "twenty"},
                               {"category_id": 30, "name": "thirty"}]
    assert card["backend"] == "pytorch" and card["device"] == "cpu" and card["fast_path"] is None
    assert {"rfdetr_serve", "rfdetr_core", "torch"} <= set(card["versions"])
    assert card["limits"]["max_upload_bytes"] == 2**20 and card["limits"]["max_pixels"] == 1_500_000
    assert card["batching"] == {"max_batch": 8, "max_wait_ms": 20.0, "max_queue": 256}


def test_multipart_and_raw_equal_predict(server, local_model, jpeg):
    want = local_model.predict(str(jpeg), threshold=0.5)
    assert len(want) > 0  # the fixture model detects something, so the comparison is not vacuous
    multipart = httpx.post(server.url + "/predict", files={"file": ("street.jpg", jpeg.read_bytes(), "image/jpeg")},
                           headers=AUTH, timeout=60)
    assert multipart.status_code == 200, multipart.text
    body = multipart.json()
    assert body["model"] == "seg-tiny" and body["batch_size"] >= 1
    assert set(body["timing_ms"]) == {"decode", "queue", "inference", "encode", "total"}
    assert multipart.headers["x-request-id"]
    assert_matches(body, want)
    raw = post(server, jpeg.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 200
    assert_matches(raw.json(), want)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF16", "WEBP", "BMP", "PNG16"])
def test_formats_equal_predict(server, local_model, tmp_path, fmt):
    from PIL import Image

    arr = image_array(90, 130, seed=2)
    suffix = {"PNG": "png", "TIFF16": "tif", "WEBP": "webp", "BMP": "bmp", "PNG16": "png"}[fmt]
    path = tmp_path / f"img.{suffix}"
    if fmt.endswith("16"):  # 16-bit greyscale
        grey = arr[..., 0].astype(np.uint16) * 257 + 3
        Image.fromarray(grey).save(path, format=fmt[:-2].replace("TIFF", "TIFF"))
    else:
        Image.fromarray(arr).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    r = post(server, path.read_bytes())
    assert r.status_code == 200, r.text
    assert_matches(r.json(), local_model.predict(str(path), threshold=0.5))


def test_options_threshold_classes_max_detections_and_mask_formats(server, local_model, jpeg):
    data = jpeg.read_bytes()
    low = local_model.predict(str(jpeg), threshold=0.3)
    assert_matches(post(server, data, {"threshold": 0.3}).json(), low)
    top2 = post(server, data, {"threshold": 0.3, "max_detections": 2}).json()["detections"]
    assert [d["score"] for d in top2] == pytest.approx(low.scores[:2].tolist(), abs=1e-6)
    only = post(server, data, {"threshold": 0.3, "classes": "twenty,30"}).json()["detections"]
    want = [i for i, c in enumerate(low.category_ids.tolist()) if c in (20, 30)]
    assert [d["category_id"] for d in only] == low.category_ids[want].tolist() and only
    by_form = httpx.post(server.url + "/predict", files={"file": ("a.jpg", data)},
                         data={"threshold": "0.3", "classes": "ten"}, headers=AUTH, timeout=60).json()
    assert {d["class_name"] for d in by_form["detections"]} <= {"ten"}
    assert len(by_form["detections"]) == int(np.sum(low.category_ids == 10))
    none = post(server, data, {"threshold": 0.3, "mask_format": "none"}).json()["detections"]
    assert len(none) == len(low) and all("mask" not in d for d in none)
    polys = post(server, data, {"threshold": 0.3, "mask_format": "polygon"}).json()["detections"]
    h, w = low.image_size
    for d, m in zip(polys, low.masks):
        pts = [np.asarray(p).reshape(-1, 2) for p in d["mask"]["polygons"]]
        assert bool(pts) == bool(m.any())
        for p in pts:
            assert (p[:, 0] >= 0).all() and (p[:, 0] < w).all() and (p[:, 1] >= 0).all() and (p[:, 1] < h).all()


def test_batch_endpoint_equals_single_requests(server, local_model, tmp_path):
    paths = []
    for i, (h, w) in enumerate([(80, 120), (130, 90), (64, 96)]):
        p = tmp_path / f"b{i}.png"
        p.write_bytes(encode(image_array(h, w, seed=10 + i), "PNG"))
        paths.append(p)
    r = httpx.post(server.url + "/predict/batch", files=[("files", (p.name, p.read_bytes())) for p in paths],
                   headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    for body, p in zip(results, paths):
        assert_matches(body, local_model.predict(str(p), threshold=0.5), exact=False)
    bad = httpx.post(server.url + "/predict/batch", files=[("files", ("ok.png", paths[0].read_bytes())),
                                                          ("files", ("bad.png", b"garbage"))], headers=AUTH)
    assert bad.status_code == 415 and "Image 1 (bad.png)" in bad.json()["detail"]
    assert httpx.post(server.url + "/predict/batch", content=b"x", headers=AUTH).status_code == 415


def test_error_statuses_and_messages(server, jpeg):
    data = jpeg.read_bytes()
    cases = [
        (b"", {}, 400, "no image"),
        (b"hello, not an image", {}, 415, "not an image"),
        (data[: len(data) // 2], {}, 400, "corrupt or truncated"),
        (encode(image_array(20, 20, 0), "GIF"), {}, 415, "GIF is not accepted"),
        (encode(np.zeros((1300, 1300, 3), np.uint8), "PNG"), {}, 413, "over the server's limit"),
        (data, {"threshold": 2}, 422, "threshold"),
        (data, {"max_detections": 0}, 422, "max_detections"),
        (data, {"max_detections": 301}, 422, "at most 300 (the server's limit)"),
        (data, {"mask_format": "bitmap"}, 422, "mask_format"),
    ]
    for body, params, status, message in cases:
        r = post(server, body, params)
        assert r.status_code == status, (message, r.status_code, r.text)
        assert message in r.json()["detail"], r.json()
    no_file = httpx.post(server.url + "/predict", files={"image": ("a.jpg", data)}, headers=AUTH)
    assert no_file.status_code == 400 and "named 'file'" in no_file.json()["detail"]
    big = post(server, b"\0" * (2**20 + 1))
    assert big.status_code == 413 and "1.0 MiB" in big.json()["detail"]
    assert httpx.get(server.url + "/healthz").status_code == 200  # still alive


def read_reply(s: socket.socket) -> str:
    """The HTTP answer on ``s`` until the server closes the connection (our 413 says Connection: close)."""
    data = b""
    while b"}" not in data:
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def test_oversized_body_refused_before_it_is_read(server):
    """413 comes back while the client is still sending: a declared length over the limit is refused with
    nothing read, and a chunked body is cut off once past the limit (neither waits for the whole body)."""
    host, port = "127.0.0.1", server.port
    with socket.create_connection((host, port), timeout=20) as s:
        s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                  f"Content-Length: {10 * 2**30}\r\n\r\n".encode() + b"\0" * 1000)
        reply = read_reply(s)  # 10 GiB were announced, 1000 bytes sent
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "MiB" in reply
    with socket.create_connection((host, port), timeout=20) as s:
        s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
        for _ in range(17):  # 1.06 MiB, just past the limit; the stream never ends
            s.sendall(chunk)
        reply = read_reply(s)
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "MiB" in reply


def test_metrics_exposed(server, jpeg):
    post(server, jpeg.read_bytes())
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    for name in ("rfdetr_serve_request_duration_seconds_bucket", "rfdetr_serve_queue_duration_seconds_bucket",
                 "rfdetr_serve_inference_duration_seconds_bucket", "rfdetr_serve_batch_size_bucket",
                 "rfdetr_serve_in_flight_requests"):
        assert name in text, name
    assert 'rfdetr_serve_requests_total{endpoint="/predict",status="200"}' in text


def test_64_concurrent_requests_some_corrupt(server, local_model, tmp_path):
    good = []
    for i in range(8):
        p = tmp_path / f"c{i}.jpg"
        p.write_bytes(encode(image_array(70 + 9 * i, 110 - 5 * i, seed=40 + i), "JPEG", quality=85))
        good.append(p)
    expected = [local_model.predict(str(p), threshold=0.5) for p in good]
    sequential = [post(server, p.read_bytes()).json() for p in good]
    plan = [("bad", b"corrupt" * 50) if i % 8 == 5 else ("good", i % 8) for i in range(64)]

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(
                client.post("/predict", content=good[v].read_bytes() if kind == "good" else v)
                for kind, v in plan
            ))

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert not [s for s in statuses if s >= 500], statuses
    batch_sizes = set()
    for (kind, v), r in zip(plan, responses):
        if kind == "bad":
            assert r.status_code == 415
            continue
        assert r.status_code == 200
        body = r.json()
        batch_sizes.add(body["batch_size"])
        assert_matches(body, expected[v], exact=False)
        assert [d["category_id"] for d in body["detections"]] == [
            d["category_id"] for d in sequential[v]["detections"]]
    assert max(batch_sizes) > 1  # the concurrent requests really shared model calls
