"""The server's configuration: one typed record that the CLI flags fill and every worker process reads.

``--workers N`` starts N processes through uvicorn, which imports the app by name in each of them; the
settings travel to them as JSON in the ``RFDETR_SERVE_SETTINGS`` environment variable
(:meth:`ServeSettings.to_env` / :meth:`ServeSettings.from_env`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from rfdetr_serve.limits import Limits

SETTINGS_ENV = "RFDETR_SERVE_SETTINGS"
# --optimize: core's GPU fast path for PyTorch models on CUDA (rfdetr_serve.inference.ServedModel.optimize)
OPTIMIZE_MODES = ("auto", "off", "graphs", "compile", "max-autotune")
API_KEY_ENV = "RFDETR_SERVE_API_KEY"


@dataclass(frozen=True)
class ServeSettings:
    """Everything a worker needs to serve ``model``.

    ``max_batch`` images per model call, ``max_wait_ms`` the longest the first image of a batch waits for
    others, ``max_queue`` images waiting before new ones get 503; ``threshold`` the default score threshold;
    ``api_key`` (``None`` = open) protects every endpoint but ``/healthz``, ``/readyz``, the page and the docs.
    ``optimize`` picks the GPU fast path (one of :data:`OPTIMIZE_MODES`; ``auto``: bf16 CUDA graphs for a
    PyTorch model on CUDA, nothing otherwise).
    """

    model: str
    device: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    threshold: float = 0.5
    api_key: str | None = field(default=None, repr=False)
    limits: Limits = field(default_factory=Limits)
    warm_up: bool = True
    log_level: str = "info"
    optimize: str = "auto"

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {self.max_queue}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("The API key is empty; give a non-empty --api-key (or leave it out for no key).")
        if self.optimize not in OPTIMIZE_MODES:
            raise ValueError(f"--optimize must be one of {', '.join(OPTIMIZE_MODES)}, got {self.optimize!r}")
        if self.limits.max_upload_bytes < 1 or self.limits.max_pixels < 1:
            raise ValueError("--max-upload-mb and --max-pixels must be positive")

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise RuntimeError(
                f"{SETTINGS_ENV} is not set: start the server with the `rfdetr-serve MODEL` command."
            )
        data = json.loads(raw)
        data["limits"] = Limits(**data.get("limits", {}))
        return cls(**data)
