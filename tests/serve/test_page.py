"""The page at ``/`` in a real browser: Debian's chromium, headless, driven by Playwright, uploads an image and
the drawn result and the JSON appear; a screenshot is saved (``RFDETR_SERVE_SCREENSHOT`` = where to copy it)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from serve_support import API_KEY, encode, image_array

pytestmark = pytest.mark.timeout(300)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_uploads_and_draws(server, local_model, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    browser_path = find_chromium()
    if browser_path is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's chromium: apt-get install -y chromium)")
    image = tmp_path / "upload.png"
    image.write_bytes(encode(image_array(240, 320, seed=7), "PNG"))
    want = local_model.predict(str(image), threshold=0.5)
    assert len(want) > 0

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(server.url + "/")
            page.fill("#apikey", API_KEY)
            page.dispatch_event("#apikey", "change")  # the page reloads the model card with the key
            page.wait_for_function("document.getElementById('model').textContent.includes('seg-tiny')")
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.body.dataset.state === 'done'", timeout=60_000)
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            body = json.loads(page.text_content("#json"))
            size = page.evaluate("[document.getElementById('view').width, document.getElementById('view').height]")
            # pixels of the drawn canvas: the overlay changed the uploaded image where detections are
            drawn = np.asarray(page.evaluate(
                "Array.from(document.getElementById('view').getContext('2d')"
                ".getImageData(0, 0, 320, 240).data)"), dtype=np.uint8).reshape(240, 320, 4)[..., :3]
            status = page.text_content("#status")
        finally:
            browser.close()

    assert size == [320, 240]
    assert len(body["detections"]) == len(want) and f"{len(want)} detections" in status
    changed = np.any(drawn != image_array(240, 320, seed=7), axis=-1)
    union = want.masks.any(axis=0)
    assert changed[union].mean() > 0.9  # masks are painted where predict says they are
    assert shot.stat().st_size > 10_000
    copy_to = os.environ.get("RFDETR_SERVE_SCREENSHOT")
    if copy_to:
        Path(copy_to).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, copy_to)
