"""Prometheus metrics of the server (text format at ``GET /metrics``).

The set Triton and BentoML expose (export-serve-anchors.md section 7): request, queue and inference duration
histograms, a batch-size histogram, requests by endpoint and status, and an in-flight gauge.

With ``--workers N`` every worker process is its own server; the CLI then sets ``PROMETHEUS_MULTIPROC_DIR``
and ``/metrics`` sums the processes (prometheus-client's multiprocess mode), so one scrape sees them all.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds; CPU requests of the small models take 20 ms - 2 s, GPU ones a few ms.
_DURATION_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ServerMetrics:
    """The metric objects, registered in a registry of their own (so tests can build several apps).

    In multiprocess mode the values live in files shared by the workers and :meth:`render` collects them.
    """

    def __init__(self):
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode values go to files; registering them anywhere would only duplicate them.
        registry = None if self.multiprocess else CollectorRegistry()
        self.registry = registry
        self.request_duration = Histogram(
            "rfdetr_serve_request_duration_seconds", "Time from request received to response ready.",
            ["endpoint"], buckets=_DURATION_BUCKETS, registry=registry,
        )
        self.queue_duration = Histogram(
            "rfdetr_serve_queue_duration_seconds", "Time an image waited for the model (batching included).",
            buckets=_DURATION_BUCKETS, registry=registry,
        )
        self.inference_duration = Histogram(
            "rfdetr_serve_inference_duration_seconds", "Time of one model call on a batch.",
            buckets=_DURATION_BUCKETS, registry=registry,
        )
        self.batch_size = Histogram(
            "rfdetr_serve_batch_size", "Images per model call.", buckets=_BATCH_BUCKETS, registry=registry,
        )
        self.requests = Counter(
            "rfdetr_serve_requests", "Requests answered, by endpoint and HTTP status.", ["endpoint", "status"],
            registry=registry,
        )
        kwargs = {"multiprocess_mode": "livesum"} if self.multiprocess else {}
        self.in_flight = Gauge(
            "rfdetr_serve_in_flight_requests", "Requests being handled now.", registry=registry, **kwargs,
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
