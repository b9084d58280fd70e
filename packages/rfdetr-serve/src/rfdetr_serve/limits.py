"""What the server accepts: the limits, the upload-size guard (checked while the body streams in) and the
image decoder that refuses decompression bombs before decoding a pixel.

Every refusal is a :class:`RequestRejected` carrying the HTTP status and a message that says what is wrong
and what to do; the app turns it into ``{"detail": message}``.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rfdetr_core.preprocess import OpenedImage

# Formats the API promises (PIL format names). Others that PIL happens to read (GIF, ICO, PPM, ...) are
# refused with 415 so the accepted set is the documented one.
ACCEPTED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "TIFF": "image/tiff", "WEBP": "image/webp",
                    "BMP": "image/bmp"}


@dataclass(frozen=True)
class Limits:
    """Server limits (all enforced per request).

    ``max_upload_bytes``: request body size (413 past it, counted while streaming); ``max_pixels``: width x
    height of one decoded image (413; read from the file header, before decoding); ``max_images``: images in
    one ``/predict/batch`` request (413); ``max_detections``: the largest ``max_detections`` a request may ask
    for (422 above it; without the parameter every detection over the threshold is returned).
    """

    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_images: int = 32
    max_detections: int = 300

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RequestRejected(Exception):
    """A request the server refuses: ``status`` (4xx/503) and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def too_large_message(limit: int) -> str:
    return (
        f"Request body is larger than the server's limit of {limit / 2**20:.1f} MiB; send a smaller image "
        "(or start the server with a larger --max-upload-mb)."
    )


class BodySizeLimit:
    """ASGI middleware: refuses request bodies over ``max_bytes`` with 413.

    A ``Content-Length`` over the limit is refused before any of the body is read; otherwise the bytes are
    counted as they arrive (chunked uploads, lying lengths) and the request is cut off with 413 as soon as
    the count passes the limit, so the server never buffers more than ``max_bytes`` of one request.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, 400, "Content-Length is not an integer.")
                    return
                if declared > self.max_bytes:
                    await _send_error(send, 413, too_large_message(self.max_bytes))
                    return
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if started:  # a handler already answered; nothing more can be sent
                return
            await _send_error(send, 413, too_large_message(self.max_bytes))


class _BodyTooLarge(Exception):
    pass


async def _send_error(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"detail": message}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})


@dataclass
class DecodedImage:
    """An upload decoded once, in the request's thread: ``image`` is core's
    :class:`~rfdetr_core.preprocess.OpenedImage` (what the model thread runs ``predict`` on, so the bytes are
    never decoded again), ``size`` the file's own ``(height, width)`` and ``format`` its PIL name."""

    image: OpenedImage
    format: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.source_size


def decode_image(data: bytes, max_pixels: int, min_size: tuple[int, int]) -> DecodedImage:
    """Decode one uploaded image the way ``RFDETR.predict(path)`` decodes a file (``min_size``: the model's
    ``(H, W)``, which allows JPEG draft decoding exactly as ``predict`` does).

    The format and size come from the header first (PIL opens lazily): non-images and unsupported formats
    give 415, images over ``max_pixels`` give 413 (decompression bombs never get decoded), truncated or
    corrupt data 400. The pixels are decoded once, here; nothing is converted to float yet (the model thread
    does that for the whole batch).
    """
    from PIL import Image, UnidentifiedImageError

    from rfdetr_core.preprocess import OpenedImage

    if not data:
        raise RequestRejected(400, "The request holds no image: send the image bytes (multipart field 'file' "
                                   "or the raw body).")
    buffer = io.BytesIO(data)
    try:
        with Image.open(buffer) as probe:
            fmt, (width, height) = probe.format, probe.size
    except Image.DecompressionBombError as exc:
        raise RequestRejected(413, f"Image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise RequestRejected(
            415, "The upload is not an image in a format this server reads; send JPEG, PNG, TIFF, WebP or BMP."
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestRejected(400, f"The image header is corrupt ({exc}); send a valid image file.") from exc
    if fmt not in ACCEPTED_FORMATS:
        raise RequestRejected(415, f"Image format {fmt} is not accepted; send JPEG, PNG, TIFF, WebP or BMP.")
    if width * height > max_pixels:
        raise RequestRejected(
            413, f"Image is {width}x{height} = {width * height} pixels, over the server's limit of {max_pixels} "
                 "(--max-pixels); send a smaller image."
        )
    if width < 1 or height < 1:
        raise RequestRejected(400, f"Image has an empty size {width}x{height}.")
    buffer.seek(0)
    try:
        opened = OpenedImage.open(buffer, min_size=min_size)
    except Image.DecompressionBombError as exc:  # pragma: no cover - the header check comes first
        raise RequestRejected(413, f"Image refused as a decompression bomb: {exc}") from exc
    except Exception as exc:  # untrusted bytes: any decoder failure (core's ImageError included) is the upload's
        raise RequestRejected(400, f"The {fmt} image is corrupt or truncated: {exc}") from exc
    return DecodedImage(opened, fmt)
