"""Official weights download: local http.server and file:// URLs only, never the internet."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
from functools import partial

import pytest

from rfdetr_core import variants
from rfdetr_core.errors import CheckpointError
from rfdetr_core.paths import weights_dir
from rfdetr_core.weights import download as dl

PAYLOAD = b"rf-detr test weights\n" * 5000


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    """Each test gets an empty weights cache (the suite-wide RFDETR_HOME is shared between tests)."""
    monkeypatch.setenv("RFDETR_HOME", str(tmp_path / "home"))


@pytest.fixture
def fake_registry(monkeypatch):
    """seg-nano's weights point at our payload's md5; xlarge keeps its PML licence and no md5."""
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    nano = variants.get_variant("seg-nano")
    patched = dataclasses.replace(nano, weights=dataclasses.replace(nano.weights, md5=md5))
    monkeypatch.setitem(variants._REGISTRY, "seg-nano", patched)
    return patched


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/"served"; yields (base_url, folder, request log)."""
    root = tmp_path / "served"
    root.mkdir()
    log: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            log.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, log
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_names_resolve():
    assert dl.resolve_official_name("seg-medium").name == "seg-medium"
    assert dl.resolve_official_name("rf-detr-seg-medium.pt").name == "seg-medium"
    assert dl.resolve_official_name("rf-detr-seg-m-ft.pth").name == "seg-medium"
    assert dl.resolve_official_name("seg_xxlarge").name == "seg-2xlarge"
    assert dl.resolve_official_name("medium_coco/checkpoint_best_regular.pth").name == "medium"
    assert dl.resolve_official_name("checkpoint_best_regular.pth") is None  # ambiguous on its own
    assert dl.resolve_official_name("seg-tiny") is None  # no official weights
    assert dl.resolve_official_name("my_model.pth") is None


def test_http_download_md5_checked_and_cached(fake_registry, server, monkeypatch):
    base, root, log = server
    (root / fake_registry.weights.remote).write_bytes(PAYLOAD)
    monkeypatch.setenv("RFDETR_WEIGHTS_URL", base)
    path = dl.download_weights("rf-detr-seg-nano.pt", progress=False)
    assert path == weights_dir() / "rf-detr-seg-nano.pt"
    assert path.read_bytes() == PAYLOAD
    assert log == ["/rf-detr-seg-n-ft.pth"]
    # cache hit: no second request
    assert dl.download_weights("seg-nano", progress=False) == path
    assert len(log) == 1
    # a damaged cached file is fetched again
    path.write_bytes(b"garbage")
    dl.download_weights("seg-nano", progress=False)
    assert path.read_bytes() == PAYLOAD and len(log) == 2
    assert not [p for p in weights_dir().iterdir() if p.name.endswith(".tmp")]


def test_md5_mismatch_keeps_nothing(fake_registry, server, monkeypatch):
    base, root, _ = server
    (root / fake_registry.weights.remote).write_bytes(PAYLOAD + b"tampered")
    monkeypatch.setenv("RFDETR_WEIGHTS_URL", base)
    with pytest.raises(dl.DownloadError, match="md5") as info:
        dl.download_weights("seg-nano", progress=False)
    dest = weights_dir() / "rf-detr-seg-nano.pt"
    assert str(dest) in str(info.value)
    assert list(weights_dir().iterdir()) == []  # neither the file nor a temporary one


def test_file_url(fake_registry, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / fake_registry.weights.remote).write_bytes(PAYLOAD)
    monkeypatch.setenv("RFDETR_WEIGHTS_URL", mirror.as_uri())
    assert dl.download_weights("seg-nano", progress=True).read_bytes() == PAYLOAD


def test_http_error_names_url_and_destination(fake_registry, server, monkeypatch):
    base, _, _ = server  # the file is not there: HTTP 404
    monkeypatch.setenv("RFDETR_WEIGHTS_URL", base)
    with pytest.raises(dl.DownloadError) as info:
        dl.download_weights("seg-nano", progress=False)
    msg = str(info.value)
    assert "HTTP 404" in msg
    assert f"{base}/rf-detr-seg-n-ft.pth" in msg
    assert str(weights_dir() / "rf-detr-seg-nano.pt") in msg


def test_offline_error_names_url_and_destination(fake_registry, monkeypatch):
    # a port nobody listens on stands for "offline"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RFDETR_WEIGHTS_URL", f"http://127.0.0.1:{port}/rfdetr")
    with pytest.raises(dl.DownloadError) as info:
        dl.download_weights("seg-nano", progress=False, timeout=5)
    msg = str(info.value)
    assert f"http://127.0.0.1:{port}/rfdetr/rf-detr-seg-n-ft.pth" in msg
    assert str(weights_dir() / "rf-detr-seg-nano.pt") in msg and "offline" in msg


def test_pml_weights_need_license_acceptance(server, monkeypatch):
    base, root, log = server
    w = variants.get_variant("xlarge").weights
    assert w.license == "PML-1.0" and w.md5 is None
    (root / "platform-licensed").mkdir()
    (root / w.remote).write_bytes(PAYLOAD)
    monkeypatch.setenv("RFDETR_WEIGHTS_URL", base)
    with pytest.raises(dl.LicenseNotAcceptedError, match="accept_license=True") as info:
        dl.download_weights("xlarge", progress=False)
    assert "PML-1.0" in str(info.value) and log == []
    path = dl.download_weights("rf-detr-xlarge.pth", accept_license=True, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_unknown_name(monkeypatch):
    with pytest.raises(CheckpointError, match="Official names"):
        dl.download_weights("not-a-model")


def test_a_hand_download_under_the_urls_own_name_is_used_without_renaming(fake_registry, monkeypatch):
    """Offline users fetch rf-detr-seg-n-ft.pth (the URL's name); it must work where the error says."""
    monkeypatch.setenv("RFDETR_WEIGHTS_URL", "http://127.0.0.1:9/nowhere")
    with pytest.raises(dl.DownloadError) as info:
        dl.download_weights("seg-nano", progress=False, timeout=2)
    assert str(weights_dir() / "rf-detr-seg-n-ft.pth") in str(info.value)  # both names are offered
    hand = weights_dir() / "rf-detr-seg-n-ft.pth"
    hand.write_bytes(PAYLOAD)
    assert dl.download_weights("seg-nano", progress=False) == hand  # no network, no rename
    hand.write_bytes(b"truncated")  # a wrong md5 is not taken
    with pytest.raises(dl.DownloadError):
        dl.download_weights("seg-nano", progress=False, timeout=2)
