"""The FastAPI application: ``POST /predict``, ``POST /predict/batch``, ``GET /healthz``, ``/readyz``,
``/model``, ``/metrics``, the page at ``/`` and the OpenAPI docs at ``/docs``.

Request path of an image: the body streams in under the size limit (:class:`~rfdetr_serve.limits.BodySizeLimit`)
-> decoded and checked in a thread of the pool (format, pixel limit, corrupt data) -> queued for the model
thread, which runs it in a dynamic batch (:mod:`rfdetr_serve.batching`) -> detections filtered and masks
encoded in a pool thread -> JSON. The event loop only moves bytes.

The model loads in a background thread at start-up, so ``/healthz`` answers at once and ``/readyz`` turns
200 only once the model is loaded and warmed up. Errors are ``{"detail": "..."}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from rfdetr_core.errors import MissingDependencyError
from rfdetr_serve.batching import Batcher, BatcherStopped, QueueFull
from rfdetr_serve.inference import ImageJob, ServedModel, load_rfdetr
from rfdetr_serve.limits import BodySizeLimit, RequestRejected, decode_image
from rfdetr_serve.metrics import ServerMetrics
from rfdetr_serve.responses import BatchPrediction, ErrorBody, MaskFormat, Prediction, detections_json, select
from rfdetr_serve.settings import ServeSettings

log = logging.getLogger("rfdetr_serve")
access_log = logging.getLogger("rfdetr_serve.access")
OPEN_PATHS = {"/healthz", "/readyz", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}
_IMAGE_TYPES = ["image/jpeg", "image/png", "image/tiff", "image/webp", "image/bmp", "application/octet-stream"]


class PredictParams(BaseModel):
    """Per-request options (query string or multipart form fields)."""

    threshold: float | None = Field(None, ge=0.0, le=1.0, description="keep score > threshold")
    max_detections: int | None = Field(None, ge=1, description="at most this many, highest scores first")
    classes: list[str] | None = Field(None, description="only these class names or category ids")
    mask_format: MaskFormat = MaskFormat.rle

    @field_validator("classes", mode="before")
    @classmethod
    def _split(cls, value):
        if value is None:
            return None
        items = [value] if isinstance(value, str) else list(value)
        out = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
        return out or None


class _State:
    """What the app knows at run time (one per app)."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.metrics = ServerMetrics()
        self.model: ServedModel | None = None
        self.batcher: Batcher | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.on_fatal = None  # set by the CLI: how to stop the server when the model cannot load


def _rejected(exc: RequestRejected) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)


def _format_validation(errors) -> str:
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "Invalid parameters: " + "; ".join(parts)


def create_app(settings: ServeSettings, served: ServedModel | None = None) -> FastAPI:
    """The app for ``settings``; ``served`` skips loading (an already-loaded model, for tests)."""
    state = _State(settings)
    _configure_logging(settings.log_level)

    def load() -> None:
        try:
            threads = os.environ.get("RFDETR_SERVE_TORCH_THREADS")
            if threads:  # --workers N: each process takes its share of the cores
                import torch

                torch.set_num_threads(int(threads))
            model = served or ServedModel(load_rfdetr(settings.model, settings.device), settings.model)
            model.optimize(settings.optimize, settings.max_batch)
            if settings.warm_up:
                model.warm_up(settings.max_batch)
            metrics = state.metrics

            def on_batch(size: int, seconds: float) -> None:
                metrics.batch_size.observe(size)
                metrics.inference_duration.observe(seconds)

            batcher = Batcher(model.run_batch, settings.max_batch, settings.max_wait_ms / 1000.0,
                              settings.max_queue, on_batch=on_batch)
            batcher.start()
            state.model, state.batcher = model, batcher
            state.ready.set()
            log.info(json.dumps({"event": "ready", "model": model.name, "backend": model.backend,
                                 "device": str(model.rfdetr.device), "fast_path": model.fast_path,
                                 "pid": os.getpid()}))
        except Exception as exc:  # reported on /readyz and /healthz, and the process stops
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.error(json.dumps({"event": "load_failed", "model": settings.model, "error": state.load_error}))
            log.debug("load traceback", exc_info=True)
            if state.on_fatal is not None:
                state.on_fatal()
            else:  # under `uvicorn --workers`: the process ends like on SIGTERM
                os.kill(os.getpid(), signal.SIGTERM)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load, name="rfdetr-load", daemon=True).start()
        yield
        # uvicorn has finished the in-flight requests by now (graceful shutdown); stop takes the rest.
        if state.batcher is not None:
            await run_in_threadpool(state.batcher.stop)

    app = FastAPI(
        title="rfdetr-serve",
        summary="RF-DETR-Seg instance segmentation over HTTP",
        description="Upload an image to `POST /predict`; get boxes, scores, classes and COCO-RLE masks.",
        lifespan=lifespan,
        responses={401: {"model": ErrorBody}, 503: {"model": ErrorBody}},
    )
    app.state.rfdetr = state
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_upload_bytes)
    app.add_middleware(RequestLog, state=state)  # outermost: logs and counts every answer, 413s included

    @app.exception_handler(RequestRejected)
    async def _on_rejected(request: Request, exc: RequestRejected):
        return _rejected(exc)

    @app.exception_handler(MissingDependencyError)
    async def _on_missing(request: Request, exc: MissingDependencyError):  # e.g. polygons without OpenCV
        return JSONResponse({"detail": str(exc)}, status_code=501)

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, exc: Exception):  # the traceback goes to the log; the server lives on
        rid = getattr(request.state, "request_id", "")
        log.error(json.dumps({"event": "error", "path": request.url.path, "error": f"{type(exc).__name__}: {exc}"}))
        return JSONResponse({"detail": "Internal error while handling the request; the server log has the "
                                       f"details{' (request ' + rid + ')' if rid else ''}."}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _format_validation(exc.errors())}, status_code=422)

    async def require_key(request: Request) -> None:
        key = settings.api_key
        if key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), key.encode()):
            raise RequestRejected(401, "Missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
                                  {"WWW-Authenticate": "Bearer"})

    def require_ready() -> tuple[ServedModel, Batcher]:
        if state.load_error:
            raise RequestRejected(503, f"The model failed to load: {state.load_error}")
        if not state.ready.is_set():
            raise RequestRejected(503, "The model is still loading; retry shortly.", {"Retry-After": "2"})
        return state.model, state.batcher

    async def read_params(request: Request, form=None) -> PredictParams:
        raw: dict[str, Any] = {}
        for source in (request.query_params, form):
            if source is None:
                continue
            for name in PredictParams.model_fields:
                values = [v for v in source.getlist(name) if isinstance(v, str)]
                if values:
                    raw[name] = values if name == "classes" else values[-1]
        try:
            params = PredictParams(**raw)
        except ValidationError as exc:
            raise RequestRejected(422, _format_validation(exc.errors())) from exc
        cap = settings.limits.max_detections
        if params.max_detections is not None and params.max_detections > cap:
            raise RequestRejected(422, f"Invalid parameters: max_detections: at most {cap} (the server's limit), "
                                       f"got {params.max_detections}")
        return params

    async def predict_one(data: bytes, params: PredictParams, received: float, request: Request) -> dict:
        model, batcher = require_ready()
        t0 = time.perf_counter()
        decoded = await run_in_threadpool(decode_image, data, settings.limits.max_pixels, model.resolution)
        t1 = time.perf_counter()
        threshold = settings.threshold if params.threshold is None else params.threshold
        try:
            det, timing = await batcher.submit(ImageJob(decoded.image, threshold))
        except QueueFull as exc:
            raise RequestRejected(503, f"The server is busy: {exc} Retry later.", {"Retry-After": "1"}) from exc
        except BatcherStopped as exc:
            raise RequestRejected(503, str(exc), {"Retry-After": "1"}) from exc
        state.metrics.queue_duration.observe(timing.queue_s)
        request.state.batch_size = max(getattr(request.state, "batch_size", 0), timing.batch_size)
        t2 = time.perf_counter()
        max_det = params.max_detections  # None: all that pass the threshold
        classes = set(params.classes) if params.classes else None

        def encode():
            return detections_json(det, select(det, threshold, max_det, classes), params.mask_format)

        detections = await run_in_threadpool(encode)
        t3 = time.perf_counter()
        h, w = decoded.size
        return {
            "image": {"width": w, "height": h},
            "model": model.name,
            "timing_ms": {
                "decode": 1e3 * (t1 - t0), "queue": 1e3 * timing.queue_s, "inference": 1e3 * timing.inference_s,
                "encode": 1e3 * (t3 - t2), "total": 1e3 * (t3 - received),
            },
            "batch_size": timing.batch_size,
            "detections": detections,
        }

    query_params = [
        {"name": "threshold", "in": "query", "schema": {"type": "number", "minimum": 0, "maximum": 1},
         "description": f"keep score > threshold (default {settings.threshold})"},
        {"name": "max_detections", "in": "query", "schema": {"type": "integer", "minimum": 1},
         "description": f"at most this many detections (cap {settings.limits.max_detections})"},
        {"name": "classes", "in": "query", "schema": {"type": "string"}, "example": "person,car",
         "description": "only these class names or category ids, comma-separated"},
        {"name": "mask_format", "in": "query", "schema": {"type": "string", "enum": [m.value for m in MaskFormat],
                                                          "default": "rle"}},
    ]
    image_body = {
        "parameters": query_params,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {
                    "type": "object", "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"},
                                   **{k: {"type": "string"} for k in PredictParams.model_fields}},
                }},
                **{t: {"schema": {"type": "string", "format": "binary"}} for t in _IMAGE_TYPES},
            },
        }
    }
    error_responses = {code: {"model": ErrorBody} for code in (400, 413, 415, 422)}

    @app.post("/predict", response_model=Prediction, responses=error_responses, openapi_extra=image_body,
              dependencies=[Depends(require_key)], tags=["predict"])
    async def predict(request: Request):
        """Detect and segment the objects of one image: multipart field `file`, or the image as the raw
        body. Options as query parameters (or form fields): `threshold`, `max_detections`, `classes`
        (comma-separated names or category ids), `mask_format` = `rle` (default) | `polygon` | `none`."""
        received = time.perf_counter()
        require_ready()
        content_type = request.headers.get("content-type", "")
        form = None
        if content_type.startswith("multipart/form-data"):
            form = await request.form(max_files=1)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestRejected(400, "Multipart requests must carry the image in a file field named 'file'.")
            data = await upload.read()
        else:
            data = await request.body()
        params = await read_params(request, form)
        return JSONResponse(await predict_one(data, params, received, request))

    batch_body = {
        "parameters": query_params,
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["files"],
                "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                               **{k: {"type": "string"} for k in PredictParams.model_fields}},
            }}},
        }
    }

    @app.post("/predict/batch", response_model=BatchPrediction, responses=error_responses,
              openapi_extra=batch_body, dependencies=[Depends(require_key)], tags=["predict"])
    async def predict_batch(request: Request):
        """Several images in one request: multipart fields `files` (repeated). The images join the same
        dynamic batches as single requests; the answer lists one result per image, in upload order. One bad
        image fails the whole request, naming it."""
        received = time.perf_counter()
        require_ready()
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestRejected(415, "POST /predict/batch takes multipart/form-data with repeated 'files' fields.")
        limit = settings.limits.max_images
        form = await request.form(max_files=limit + 1)
        uploads = [u for u in form.getlist("files") if not isinstance(u, str)]
        if not uploads:
            raise RequestRejected(400, "No images: send them as repeated multipart file fields named 'files'.")
        if len(uploads) > limit:
            raise RequestRejected(413, f"{len(uploads)} images in one request; the limit is {limit}.")
        params = await read_params(request, form)
        datas = [await u.read() for u in uploads]
        outcomes = await asyncio.gather(*(predict_one(d, params, received, request) for d in datas),
                                        return_exceptions=True)
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, RequestRejected):
                name = uploads[i].filename or f"#{i}"
                raise RequestRejected(outcome.status, f"Image {i} ({name}): {outcome.message}", outcome.headers)
            if isinstance(outcome, BaseException):
                raise outcome
        return JSONResponse({"results": outcomes})

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        """Liveness: 200 while the process serves requests (also while the model loads)."""
        if state.load_error:
            return JSONResponse({"status": "failed", "detail": state.load_error}, status_code=500)
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorBody}})
    async def readyz():
        """Readiness: 200 once the model is loaded and warmed up, 503 before."""
        if state.ready.is_set():
            return {"status": "ready", "model": state.model.name}
        detail = f"The model failed to load: {state.load_error}" if state.load_error else "The model is loading."
        return JSONResponse({"status": "loading", "detail": detail}, status_code=503)

    @app.get("/model", dependencies=[Depends(require_key)], tags=["ops"])
    async def model_card():
        """The model card (variant, resolution, classes, backend, versions) and the server's limits."""
        model, _ = require_ready()
        return {
            **model.card(),
            "default_threshold": settings.threshold,
            "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                         "max_queue": settings.max_queue},
            "limits": settings.limits.to_json(),
            "auth": settings.api_key is not None,
        }

    @app.get("/metrics", dependencies=[Depends(require_key)], tags=["ops"])
    async def metrics():
        """Prometheus text format."""
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(files("rfdetr_serve").joinpath("static/index.html").read_text(encoding="utf-8"))

    return app


class RequestLog:
    """ASGI middleware: a request id (``X-Request-ID``, taken from the client or made), one JSON log line
    per request (id, method, path, status, latency, batch size) and the request metrics."""

    def __init__(self, app, state: _State):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers", ()))
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        status = 500
        metrics = self.state.metrics
        scope.setdefault("state", {})["request_id"] = request_id  # request.state.request_id for handlers

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            raise
        finally:
            metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics.request_duration.labels(endpoint).observe(seconds)
            metrics.requests.labels(endpoint, str(status)).inc()
            batch = scope.get("state", {}).get("batch_size")
            access_log.info(json.dumps({
                "id": request_id, "method": scope.get("method"), "path": scope.get("path"), "status": status,
                "latency_ms": round(1e3 * seconds, 2), "batch_size": batch,
            }))


def _configure_logging(level: str) -> None:
    for logger in (log, access_log):
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(level.upper())


def app_from_env() -> FastAPI:
    """The app factory uvicorn imports in each worker process (settings from ``RFDETR_SERVE_SETTINGS``)."""
    return create_app(ServeSettings.from_env())
