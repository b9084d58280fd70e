"""The served model in-process: an upload is decoded once (in the request's thread, never again on the model
thread), and a batch of decoded uploads gives what ``RFDETR.predict`` gives on the files themselves."""

from __future__ import annotations

import io

import numpy as np
import pytest
from serve_support import encode, image_array

from rfdetr_serve.inference import ImageJob, ServedModel
from rfdetr_serve.limits import decode_image


@pytest.fixture(scope="module")
def uploads() -> list[bytes]:
    """A JPEG large enough for draft decoding (400x600 for a 64x96 model), a PNG and a 16-bit PNG."""
    from PIL import Image

    grey = image_array(70, 50, seed=5)[..., 0].astype(np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    return [encode(image_array(400, 600, seed=3), "JPEG", quality=90), encode(image_array(90, 130, seed=4), "PNG"),
            buf.getvalue()]


def test_upload_decoded_once_and_batch_equals_predict(local_model, uploads, monkeypatch):
    import PIL.Image

    served = ServedModel(local_model, "test")
    loads = []
    real_load = PIL.ImageFile.ImageFile.load

    def counting_load(self):
        if self.tile:  # pixels still to decode (PIL empties the tile list once decoded)
            loads.append(self.format)
        return real_load(self)

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", counting_load)
    decoded = [decode_image(data, 40_000_000, served.resolution) for data in uploads]
    assert loads == ["JPEG", "PNG", "PNG"]  # the request thread: one decode per upload
    assert decoded[0].size == (400, 600)  # the file's own size, whatever scale the JPEG was decoded at
    got = served.run_batch([ImageJob(d.image, 0.5) for d in decoded])
    assert len(loads) == 3  # the model thread decodes nothing again
    monkeypatch.undo()
    wants = local_model.predict([io.BytesIO(data) for data in uploads], threshold=0.5)  # the files, one batch
    for det, want in zip(got, wants, strict=True):
        assert det.image_size == want.image_size
        np.testing.assert_array_equal(det.boxes, want.boxes)
        np.testing.assert_array_equal(det.scores, want.scores)
        np.testing.assert_array_equal(det.masks, want.masks)
